// The KV snapshot envelope: written atomically, read back unchanged, and every kind of bad file
// refused with an error naming it, the file left as it was.
import Foundation
import Testing
@testable import Artifacts

@Suite("Snapshot files")
struct SnapshotFileTests {
    let fingerprint = "model-a"
    var identity: SnapshotIdentity {
        SnapshotIdentity(model: fingerprint, queue: "0b5c6e0a-9d57-4f3e-8a36-2f1f3f5e1c11", job: 7, imageSHA256: String(repeating: "ab", count: 32),
                         prompt: "Describe the image.", parameters: #"{"max_tokens":8}"#)
    }
    let payload = Data((0..<50_000).map { UInt8(truncatingIfNeeded: $0 * 7 / 3) })

    @Test("a snapshot is read back with its payload, model and checksum")
    func roundTrip() throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let url = directory.appendingPathComponent("job-1.kv.zst")
        let written = try SnapshotFile.write(payload, identity: identity, to: url)
        let contents = try SnapshotFile.read(from: url, expected: identity)
        #expect(contents.payload == payload && contents.identity == identity && contents.formatVersion == 2)
        #expect(contents.payloadSHA256 == Checksum.sha256Hex(payload) && contents.fileBytes == written.bytes)
        // No temporary file is left beside it.
        #expect(try FileManager.default.contentsOfDirectory(atPath: directory.path) == ["job-1.kv.zst"])
    }

    @Test("bad magic, an unknown version, another model, truncation and a checksum mismatch are refused, naming the file")
    func badFilesAreRefused() throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let good = try SnapshotFile.encode(payload, identity: identity)
        let headerEnd = 16 + fingerprint.utf8.count + 4 + identity.queue.utf8.count + 8 + 4 + identity.imageSHA256.utf8.count
            + 4 + identity.prompt.utf8.count + 4 + identity.parameters.utf8.count
        func damaged(_ change: (inout Data) -> Void) -> Data {
            var data = good
            change(&data)
            return data
        }
        // The recorded sha256 is checked even when the zstd frame is intact.
        let otherPayload = try SnapshotFile.encode(payload.dropLast() + Data([0xFF]), identity: identity)
        let cases: [(String, Data, (String) -> SnapshotFileError?)] = [
            ("magic", damaged { $0[0] = UInt8(ascii: "X") }, { .notASnapshot(path: $0) }),
            ("version", damaged { $0[8] = 9 }, { .unsupportedVersion(path: $0, version: 9, supported: 2) }),
            ("version 1", damaged { $0[8] = 1 }, { .unsupportedVersion(path: $0, version: 1, supported: 2) }),
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
                _ = try SnapshotFile.read(from: url, expected: identity)
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

    @Test("a snapshot is refused for any other job, queue, image, prompt or parameters, naming the file and the difference")
    func anotherJobsSnapshotIsRefused() throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let url = directory.appendingPathComponent("job-7.kv.zst")
        try SnapshotFile.write(payload, identity: identity, to: url)
        let before = try Data(contentsOf: url)
        var otherJob = identity, otherQueue = identity, otherImage = identity, otherPrompt = identity, otherParameters = identity, otherModel = identity
        otherJob.job = 8
        otherQueue.queue = "5f0d3a7e-1111-4c2b-9a0e-0123456789ab"
        otherImage.imageSHA256 = String(repeating: "cd", count: 32)
        otherPrompt.prompt = "Describe another image."
        otherParameters.parameters = #"{"max_tokens":9}"#
        otherModel.model = "model-b"
        let cases: [(SnapshotIdentity, String)] = [
            (otherJob, "it was written for job 7 of queue \(identity.queue), not job 8 of queue \(identity.queue)"),
            (otherQueue, "it was written for job 7 of queue \(identity.queue), not job 7 of queue \(otherQueue.queue)"),
            (otherImage, "it was taken for an image with sha256 \(identity.imageSHA256), the job's image has \(otherImage.imageSHA256)"),
            (otherPrompt, "it was taken for another prompt"),
            (otherParameters, #"it was taken with parameters {"max_tokens":8}, the job asks for {"max_tokens":9}"#),
        ]
        for (expected, reason) in cases {
            let error = #expect(throws: SnapshotFileError.self) { try SnapshotFile.read(from: url, expected: expected) }
            #expect(error == .differentJob(path: url.path, reason: reason))
            #expect(error?.description == "\(url.path) does not belong to this job: \(reason)")
        }
        let error = #expect(throws: SnapshotFileError.self) { try SnapshotFile.read(from: url, expected: otherModel) }
        #expect(error == .differentModel(path: url.path, found: "model-a", expected: "model-b"))
        #expect(try Data(contentsOf: url) == before)
    }
}
