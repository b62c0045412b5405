// The encodings a KV snapshot frame can be stored in, on real K/V: the full-frame payload
// of each given snapshot file (`dllava run --keep-kv` writes them) stored as it is, with zstd, and
// byte-shuffled then zstd. Bytes, and encode and decode speed in MB/s of payload; each time is the
// best of several repeats, the encodings taking turns within every repeat.
import Artifacts
import ArgumentParser
import Dispatch
import DynamicLLaVA
import Foundation

struct SnapshotEncodingBenchmark: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "snapshot-encodings",
        abstract: "Snapshot frame encodings on real K/V: none, zstd, byte-shuffled zstd; bytes and MB/s, best of N.")

    @Argument(help: "Snapshot files (.kv.zst) whose state is measured.")
    var files: [String]

    @Option(help: "Repeats; each time is the fastest.")
    var repeats = 3

    func run() throws {
        var payloads: [Data] = []
        for file in files {
            let contents = try SnapshotFile.read(from: URL(fileURLWithPath: file), limits: .absolute(maxBytes: 1 << 30), key: nil)
            payloads.append(try GenerationSnapshot(frames: contents.payloads).frame().payload)
        }
        let total = payloads.reduce(0) { $0 + $1.count }
        print("# dllava-bench snapshot-encodings: \(files.count) snapshot\(files.count == 1 ? "" : "s"), \(total) bytes of full-frame payload; best of \(repeats)")
        print("")
        print("| encoding | bytes | of the payload | encode MB/s | decode MB/s |")
        print("|---|---|---|---|---|")
        let encodings = SnapshotEncoding.allCases
        var stored = [Int](repeating: 0, count: encodings.count)
        var encodeSeconds = [Double](repeating: .infinity, count: encodings.count)
        var decodeSeconds = [Double](repeating: .infinity, count: encodings.count)
        for _ in 0..<repeats {
            for (index, encoding) in encodings.enumerated() {
                var encoded: [Data] = []
                let start = DispatchTime.now()
                for payload in payloads { encoded.append(try encoding.encode(payload)) }
                let middle = DispatchTime.now()
                for (payload, bytes) in zip(payloads, encoded) {
                    guard try encoding.decode(bytes, maxSize: payload.count) == payload else { throw ValidationError("\(encoding) does not round-trip") }
                }
                let end = DispatchTime.now()
                stored[index] = encoded.reduce(0) { $0 + $1.count }
                encodeSeconds[index] = min(encodeSeconds[index], Double(middle.uptimeNanoseconds - start.uptimeNanoseconds) / 1e9)
                decodeSeconds[index] = min(decodeSeconds[index], Double(end.uptimeNanoseconds - middle.uptimeNanoseconds) / 1e9)
            }
        }
        for (index, encoding) in encodings.enumerated() {
            let megabytes = Double(total) / 1e6
            // Storing the payload as it is does no work: no speed to give.
            let speeds = encoding == .none ? "no work | no work"
                : "\(String(format: "%.0f", megabytes / encodeSeconds[index])) | \(String(format: "%.0f", megabytes / decodeSeconds[index]))"
            print("| \(encoding) | \(stored[index]) | \(String(format: "%.3f", Double(stored[index]) / Double(total))) | \(speeds) |")
        }
    }
}
