// Hand-made snapshot bytes for the hostile-input tests, written from the file format (docs/FORMATS.md, "KV snapshots")
// rather than through the writer, so that they can declare what they like; and the peak memory of a process.
import Crypto
import Foundation

public enum CraftedSnapshot {
    /// One zstd frame of `count` zero bytes made of RLE blocks of 128 KiB, 4 bytes each (1 GiB in 32 KiB). Its header
    /// declares `declared` content bytes (`count` when nil), or no content size at all with `omitSize`.
    public static func zstdZeros(count: Int, declaring declared: UInt64? = nil, omitSize: Bool = false) -> Data {
        var data = Data([0x28, 0xB5, 0x2F, 0xFD])
        // Frame header descriptor: an 8-byte content size (or none), no single segment, no checksum, no dictionary;
        // then a window of 2^17 bytes, which caps blocks at 128 KiB.
        data.append(omitSize ? 0x00 : 0xC0)
        data.append(0x38)
        if !omitSize { withUnsafeBytes(of: (declared ?? UInt64(count)).littleEndian) { data.append(contentsOf: $0) } }
        let blockSize = 128 << 10
        var remaining = count
        repeat {
            let size = min(remaining, blockSize)
            remaining -= size
            let header = UInt32(remaining == 0 ? 1 : 0) | (1 << 1) | (UInt32(size) << 3)
            data.append(contentsOf: [UInt8(header & 0xFF), UInt8(header >> 8 & 0xFF), UInt8(header >> 16 & 0xFF), 0])
        } while remaining > 0
        return data
    }

    /// A snapshot frame's header fields and stored bytes, as a crafted file declares them.
    public struct Frame: Sendable {
        public var kind: UInt8, encoding: UInt8, steps: UInt64, cells: UInt64, payloadBytes: UInt64, stored: Data

        public init(kind: UInt8, encoding: UInt8, steps: UInt64, cells: UInt64, payloadBytes: UInt64, stored: Data) {
            (self.kind, self.encoding, self.steps, self.cells, self.payloadBytes, self.stored) = (kind, encoding, steps, cells, payloadBytes, stored)
        }
    }

    /// `header` (a file header with its tag) followed by `frames`, each with its sha256 and its HMAC-SHA256 tag under
    /// `secret` right (format 4's layout).
    public static func file(header: Data, frames: [Frame], secret: Data) -> Data {
        var data = header
        let key = SymmetricKey(data: secret)
        for frame in frames {
            var fields = Data("KVFR".utf8)
            fields.append(contentsOf: [frame.kind, frame.encoding, 0, 0])
            for value in [frame.steps, frame.cells, frame.payloadBytes, UInt64(frame.stored.count)] {
                withUnsafeBytes(of: value.littleEndian) { fields.append(contentsOf: $0) }
            }
            var hasher = SHA256()
            hasher.update(data: fields)
            hasher.update(data: frame.stored)
            let digest = Data(hasher.finalize())
            var authenticator = HMAC<SHA256>(key: key)
            authenticator.update(data: header.suffix(32))
            authenticator.update(data: withUnsafeBytes(of: UInt64(data.count).littleEndian) { Data($0) })
            authenticator.update(data: fields)
            authenticator.update(data: digest)
            data.append(fields + digest + Data(authenticator.finalize()) + frame.stored)
        }
        return data
    }
}

/// Resets this process's peak resident set (VmHWM) to its current resident set.
public func resetPeakResidentSet() throws {
    try Data("5".utf8).write(to: URL(fileURLWithPath: "/proc/self/clear_refs"))
}

/// This process's peak resident set since the last reset (VmHWM), and its resident set now (VmRSS), in kB.
public func residentSetKilobytes() throws -> (peak: Int, now: Int) {
    let status = try String(contentsOfFile: "/proc/self/status", encoding: .utf8)
    func field(_ name: String) -> Int {
        let line = status.split(separator: "\n").first { $0.hasPrefix(name + ":") } ?? ""
        return Int(line.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first ?? "") ?? 0
    }
    return (field("VmHWM"), field("VmRSS"))
}

/// Runs `dllava arguments` under `/usr/bin/time` and returns what it printed and its peak resident set in kB.
public func runDLLaVAMeasuringMemory(_ arguments: [String], in directory: URL? = nil) throws -> (result: ProcessResult, peakKilobytes: Int) {
    let report = FileManager.default.temporaryDirectory.appendingPathComponent("dllava-time-\(UUID().uuidString)")
    defer { try? FileManager.default.removeItem(at: report) }
    let result = try runProgram(URL(fileURLWithPath: "/usr/bin/time"), ["-f", "%M", "-o", report.path, dllavaExecutable.path] + arguments,
                                in: directory)
    // time(1) writes "Command exited with non-zero status N" before the figure when the command fails.
    let lines = try String(contentsOf: report, encoding: .utf8).split(separator: "\n")
    let peak = Int(lines.last ?? "") ?? -1
    return (result, peak)
}
