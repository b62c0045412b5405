// The KV snapshot envelope: written atomically, read back unchanged, and every kind of bad file
// refused with an error naming it, the file left as it was.
import Foundation
import Testing
@testable import Artifacts

@Suite("Snapshot files")
struct SnapshotFileTests {
    let fingerprint = "model-a"
    let payload = Data((0..<50_000).map { UInt8(truncatingIfNeeded: $0 * 7 / 3) })

    @Test("a snapshot is read back with its payload, model and checksum")
    func roundTrip() throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let url = directory.appendingPathComponent("job-1.kv.zst")
        let written = try SnapshotFile.write(payload, modelFingerprint: fingerprint, to: url)
        let contents = try SnapshotFile.read(from: url, expectedModel: fingerprint)
        #expect(contents.payload == payload && contents.modelFingerprint == fingerprint && contents.formatVersion == 1)
        #expect(contents.payloadSHA256 == Checksum.sha256Hex(payload) && contents.fileBytes == written.bytes)
        // No temporary file is left beside it.
        #expect(try FileManager.default.contentsOfDirectory(atPath: directory.path) == ["job-1.kv.zst"])
    }

    @Test("bad magic, an unknown version, another model, truncation and a checksum mismatch are refused, naming the file")
    func badFilesAreRefused() throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let good = try SnapshotFile.encode(payload, modelFingerprint: fingerprint)
        let headerEnd = 16 + fingerprint.utf8.count
        func damaged(_ change: (inout Data) -> Void) -> Data {
            var data = good
            change(&data)
            return data
        }
        // The recorded sha256 is checked even when the zstd frame is intact.
        let otherPayload = try SnapshotFile.encode(payload.dropLast() + Data([0xFF]), modelFingerprint: fingerprint)
        let cases: [(String, Data, (String) -> SnapshotFileError?)] = [
            ("magic", damaged { $0[0] = UInt8(ascii: "X") }, { .notASnapshot(path: $0) }),
            ("version", damaged { $0[8] = 9 }, { .unsupportedVersion(path: $0, version: 9, supported: 1) }),
            ("model", damaged { $0[16] = UInt8(ascii: "b") }, { .differentModel(path: $0, found: "bodel-a", expected: "model-a") }),
            ("header cut", good.prefix(headerEnd + 20), { .truncated(path: $0) }),
            ("payload cut", good.prefix(good.count - 10), { .truncated(path: $0) }),
            ("checksum", damaged { $0[headerEnd + 8] ^= 1 }, { .checksumMismatch(path: $0, expected: "", actual: "") }),
            ("swapped payload", otherPayload.prefix(headerEnd + 8) + good.dropFirst(headerEnd + 8).prefix(32) + otherPayload.dropFirst(headerEnd + 40),
             { .checksumMismatch(path: $0, expected: "", actual: "") }),
            ("empty", Data(), { .notASnapshot(path: $0) }),
        ]
        for (name, bytes, expected) in cases {
            let url = directory.appendingPathComponent("\(name).kv.zst")
            try bytes.write(to: url)
            do {
                _ = try SnapshotFile.read(from: url, expectedModel: fingerprint)
                Issue.record("\(name): accepted")
            } catch {
                #expect(error.path == url.path, "\(name)")
                #expect(error.description.contains(url.path), "\(name)")
                if case .checksumMismatch = error, case .checksumMismatch? = expected(url.path) {
                } else {
                    #expect(error == expected(url.path), "\(name): \(error)")
                }
            }
            #expect(try Data(contentsOf: url) == bytes, "\(name): the file changed")
        }
        let missing = directory.appendingPathComponent("none").path
        let error = #expect(throws: SnapshotFileError.self) { try SnapshotFile.read(from: URL(fileURLWithPath: missing)) }
        #expect(error?.path == missing && error?.description.hasPrefix("cannot read the snapshot \(missing)") == true)
    }
}
