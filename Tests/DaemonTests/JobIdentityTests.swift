// Job identity: a result or snapshot written for one job is never taken for
// another's, whether the id was pruned and handed out again, the file was swapped, a second queue shares
// `--out`, the model was retrained to the same size, or the image was replaced after enqueue.
import Artifacts
import CommandLineSupport
import Foundation
import Testing

/// Writes `lines` as a JSONL manifest named `name` in `directory`.
func writeManifest(_ lines: [[String: Any]], named name: String, in directory: URL) throws {
    let text = lines.map { String(decoding: try! JSONSerialization.data(withJSONObject: $0, options: [.sortedKeys]), as: UTF8.self) }
    try Data((text.joined(separator: "\n") + "\n").utf8).write(to: directory.appendingPathComponent(name))
}

/// The text `generate` gives for `image` alone with the tiny model.
func captionAlone(_ image: String, prompt: String, maxTokens: Int, in directory: URL, model: String = tinyModel) throws -> String {
    let alone = try run(["generate", "--model", model, "--image", image, "--prompt", prompt, "--max-tokens", "\(maxTokens)", "--json"], in: directory)
    let object = try JSONSerialization.jsonObject(with: Data(alone.standardOutput.utf8)) as! [String: Any]
    return object["text"] as! String
}

@Suite("dllava run: job identity", .serialized)
struct JobIdentityTests {
    @Test("after prune, a new job never gets the pruned job's id, result file or kept snapshot; prune --delete-outputs removes snapshots too")
    func aPrunedJobsIDIsNeverReused() throws {
        let directory = try workspace(manifest: [["custom_id": "first", "image": sample("test_000000.png"), "prompt": "Describe.", "max_tokens": 6]])
        defer { try? FileManager.default.removeItem(at: directory) }
        let first = try startRun(["--keep-kv"], in: directory)
        first.waitUntilExit()
        #expect(first.terminationStatus == 0)
        let firstResult = try #require(try outputs(directory)["first"])
        #expect(FileManager.default.fileExists(atPath: snapshotFile(directory, job: 1).path))
        Thread.sleep(forTimeInterval: 0.01)
        let prune = try run(["prune", "--db", "q.sqlite", "--older-than", "1ms"], in: directory)
        #expect(prune.status == 0 && prune.standardOutput == "deleted 1 finished job older than 1ms\n", "\(prune.standardError)")

        // Another image, the same question and parameters.
        try writeManifest([["custom_id": "second", "image": sample("test_000001.png"), "prompt": "Describe.", "max_tokens": 6]],
                          named: "second.jsonl", in: directory)
        #expect(try run(["enqueue", "--db", "q.sqlite", "--jsonl", "second.jsonl"], in: directory).status == 0)
        let show = try run(["show", "--db", "q.sqlite", "--custom-id", "second", "--json"], in: directory)
        let row = try JSONSerialization.jsonObject(with: Data(show.standardOutput.utf8)) as! [String: Any]
        #expect(row["id"] as? Int == 2, "the pruned job's id was handed out again")
        let second = try startRun(["--keep-kv"], in: directory)
        second.waitUntilExit()
        #expect(second.terminationStatus == 0)
        let log = try String(contentsOf: directory.appendingPathComponent("run.log"), encoding: .utf8)
        #expect(!log.contains("resuming from"), "\(log)")
        let results = try outputs(directory)
        #expect(results["second"]?.1 == (try captionAlone(sample("test_000001.png"), prompt: "Describe.", maxTokens: 6, in: directory)))
        // The pruned job's result file is still its own.
        #expect(results["first"]?.0 == firstResult.0 && results["first"]?.1 == firstResult.1)

        Thread.sleep(forTimeInterval: 0.01)
        let delete = try run(["prune", "--db", "q.sqlite", "--older-than", "1ms", "--delete-outputs"], in: directory)
        #expect(delete.standardOutput == "deleted 1 finished job older than 1ms and 1 result file and 1 snapshot\n", "\(delete.standardError)")
        #expect(!FileManager.default.fileExists(atPath: snapshotFile(directory, job: 2).path))
    }

    @Test("two queues sharing one --out keep their own result files: both export their own captions")
    func twoQueuesShareAnOutputFolder() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("dllava-identity-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let images = ["one": sample("test_000000.png"), "two": sample("test_000003.png")]
        for (name, image) in images {
            try writeManifest([["custom_id": name, "image": image, "prompt": "Describe.", "max_tokens": 6]], named: "\(name).jsonl", in: directory)
            #expect(try run(["init", "--db", "\(name).sqlite"], in: directory).status == 0)
            #expect(try run(["enqueue", "--db", "\(name).sqlite", "--jsonl", "\(name).jsonl"], in: directory).status == 0)
        }
        for name in ["one", "two"] {
            let daemon = try run(["run", "--db", "\(name).sqlite", "--model", tinyModel, "--out", "out", "--until-empty"], in: directory)
            #expect(daemon.status == 0, "\(daemon.standardError)")
        }
        for (name, image) in images {
            let export = try run(["export", "--db", "\(name).sqlite", "--output", "-"], in: directory)
            #expect(export.status == 0, "\(export.standardError)")
            let record = try JSONSerialization.jsonObject(with: Data(export.standardOutput.utf8)) as! [String: Any]
            #expect(record["job_id"] as? Int == 1 && record["state"] as? String == "succeeded")
            #expect(record["text"] as? String == (try captionAlone(image, prompt: "Describe.", maxTokens: 6, in: directory)), "\(name)")
            // The result file names its queue in its folder and in its JSON.
            let status = try run(["status", "--db", "\(name).sqlite", "--json"], in: directory)
            let queue = (try JSONSerialization.jsonObject(with: Data(status.standardOutput.utf8)) as! [String: Any])["queue_id"] as! String
            let file = directory.appendingPathComponent("out/\(queue)/1-1.json.zst")
            #expect(try ResultFile.read(ResultSummary.self, from: file).queueID == queue)
        }
    }

    @Test("a model whose weights changed but kept their size is another model: its snapshots are refused")
    func aRetrainedModelOfTheSameSizeIsToldApart() throws {
        let directory = try workspace(manifest: [["custom_id": "job", "image": sample("test_000002.png"), "prompt": "Describe.", "max_tokens": 300]])
        defer { try? FileManager.default.removeItem(at: directory) }
        let model = directory.appendingPathComponent("model")
        try FileManager.default.copyItem(at: URL(fileURLWithPath: tinyModel), to: model)
        let interrupted = try startRun(["--model", model.path, "--snapshot-every", "10"], in: directory)
        waitFor(snapshotFile(directory, job: 1))
        kill(interrupted.processIdentifier, SIGTERM)
        interrupted.waitUntilExit()
        #expect(interrupted.terminationStatus == 0)
        try #require(FileManager.default.fileExists(atPath: snapshotFile(directory, job: 1).path))

        // "Retrain": the lowest bit of the first weight changes; the file keeps its size.
        let weights = model.appendingPathComponent("model.safetensors")
        var bytes = try Data(contentsOf: weights)
        let headerLength = bytes.prefix(8).withUnsafeBytes { Int(UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self))) }
        bytes[8 + headerLength] ^= 1
        try bytes.write(to: weights)

        let restart = try startRun(["--model", model.path], in: directory)
        restart.waitUntilExit()
        #expect(restart.terminationStatus == 0)
        let log = try String(contentsOf: directory.appendingPathComponent("run.log"), encoding: .utf8)
        #expect(log.contains("job 1: \(snapshotFile(directory, job: 1).path) was taken with model "), "\(log)")
        #expect(!log.contains("resuming from"), "\(log)")
        #expect(try export(directory)["job"]?["state"] as? String == "succeeded")
    }

    @Test("an image replaced after enqueue fails its job with an error naming the file; the queue's other jobs succeed")
    func aReplacedImageFailsItsJob() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("dllava-identity-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let image = directory.appendingPathComponent("photo.png")
        try FileManager.default.copyItem(at: URL(fileURLWithPath: sample("test_000000.png")), to: image)
        try writeManifest([["custom_id": "replaced", "image": image.path, "prompt": "Describe.", "max_tokens": 6],
                           ["custom_id": "kept", "image": sample("test_000001.png"), "prompt": "Describe.", "max_tokens": 6]],
                          named: "jobs.jsonl", in: directory)
        #expect(try run(["init", "--db", "q.sqlite"], in: directory).status == 0)
        #expect(try run(["enqueue", "--db", "q.sqlite", "--jsonl", "jobs.jsonl"], in: directory).status == 0)
        try FileManager.default.removeItem(at: image)
        try FileManager.default.copyItem(at: URL(fileURLWithPath: sample("test_000003.png")), to: image)

        let daemon = try run(["run", "--db", "q.sqlite", "--model", tinyModel, "--out", "out", "--until-empty"], in: directory)
        #expect(daemon.status == 0, "\(daemon.standardError)")
        let records = try export(directory)
        #expect(records["replaced"]?["state"] as? String == "failed")
        let error = records["replaced"]?["error"] as? String ?? ""
        #expect(error.contains("the image \(image.path) changed after the job was enqueued"), "\(error)")
        #expect(records["kept"]?["state"] as? String == "succeeded")
    }
}
