// KV snapshots with real `dllava run` processes and signals: a graceful stop snapshots and
// releases the running jobs and a restart resumes them to the uninterrupted output (a corrupt or
// mismatched snapshot restarting its job from scratch); a running job's cancel; `snapshot inspect`.
import Artifacts
import CommandLineSupport
import Foundation
import GRDB
import Numerics
import Testing

/// Generous bounds for the tests that are not about them.
let testLimits = SnapshotLimits.absolute(maxBytes: 1 << 30)

/// The tiny Dynamic-LLaVA test checkpoint: random weights that rarely emit end-of-sequence, so
/// jobs run to max_tokens and stay in their batch long enough to be interrupted.
let tinyModel = repository.appendingPathComponent("Tests/EngineTests/Fixtures/models/dynamic_llava_tiny").path

/// A queue in a fresh directory holding one job per manifest line.
func workspace(manifest lines: [[String: Any]]) throws -> URL {
    let directory = FileManager.default.temporaryDirectory.appendingPathComponent("dllava-snapshots-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
    let text = lines.map { String(decoding: try! JSONSerialization.data(withJSONObject: $0, options: [.sortedKeys]), as: UTF8.self) }
    try Data((text.joined(separator: "\n") + "\n").utf8).write(to: directory.appendingPathComponent("jobs.jsonl"))
    try #require(try run(["init", "--db", "q.sqlite"], in: directory).status == 0)
    try #require(try run(["enqueue", "--db", "q.sqlite", "--jsonl", "jobs.jsonl"], in: directory).status == 0)
    return directory
}

/// custom_id -> (token ids, text) of every result file under `out`.
func outputs(_ directory: URL) throws -> [String: ([Int32], String)] {
    struct Output: Decodable {
        let custom_id: String
        let token_ids: [Int32]
        let text: String
    }
    let out = try queueOutput(directory)
    var outputs: [String: ([Int32], String)] = [:]
    for name in try FileManager.default.contentsOfDirectory(atPath: out.path) where name.hasSuffix(".json.zst") {
        let output = try ResultFile.read(Output.self, from: out.appendingPathComponent(name))
        #expect(outputs[output.custom_id] == nil, "\(output.custom_id) has two result files")
        outputs[output.custom_id] = (output.token_ids, output.text)
    }
    return outputs
}

func snapshotFile(_ directory: URL, job: Int) -> URL {
    try! queueOutput(directory).appendingPathComponent("snapshots/job-\(job).kv.zst")
}

/// Starts `dllava run` in `directory`; its stderr goes to `run.log` there.
func startRun(_ arguments: [String], in directory: URL) throws -> Process {
    let process = Process()
    process.executableURL = dllavaExecutable
    process.arguments = ["run", "--db", "q.sqlite", "--model", tinyModel, "--out", "out", "--until-empty"] + arguments
    process.currentDirectoryURL = directory
    process.standardOutput = FileHandle.nullDevice
    let log = directory.appendingPathComponent("run.log")
    _ = FileManager.default.createFile(atPath: log.path, contents: nil)
    process.standardError = try FileHandle(forWritingTo: log)
    try process.run()
    return process
}

/// Waits (up to a minute, a safety net rather than a timing) until `file` exists.
func waitFor(_ file: URL) {
    let deadline = Date().addingTimeInterval(60)
    while !FileManager.default.fileExists(atPath: file.path) && Date() < deadline { Thread.sleep(forTimeInterval: 0.01) }
}

@Suite("dllava run: KV snapshots, graceful stop, cancel", .serialized)
struct SnapshotDaemonTests {
    /// Six jobs, greedy and seeded sampling.
    let manifest: [[String: Any]] = (0..<6).map { i in
        var line: [String: Any] = ["custom_id": "job\(i)", "image": sample("test_00000\(i % 4).png"), "prompt": "Describe picture \(i).",
                                   "max_tokens": 300]
        if i % 2 == 1 { line["temperature"] = 1.0; line["seed"] = i }
        return line
    }

    @Test("SIGTERM mid-batch: exit 0, running jobs snapshotted and released; the restart resumes them to the uninterrupted output, a corrupt or mismatched snapshot restarting its job from scratch")
    func gracefulStopAndResume() throws {
        let reference = try workspace(manifest: manifest)
        defer { try? FileManager.default.removeItem(at: reference) }
        let uninterrupted = try startRun(["--batch-size", "3", "--snapshot-every", "0"], in: reference)
        uninterrupted.waitUntilExit()
        #expect(uninterrupted.terminationStatus == 0)
        let expected = try outputs(reference)
        #expect(expected.count == manifest.count)

        let directory = try workspace(manifest: manifest)
        defer { try? FileManager.default.removeItem(at: directory) }
        let interrupted = try startRun(["--batch-size", "3", "--snapshot-every", "10"], in: directory)
        waitFor(snapshotFile(directory, job: 1))
        kill(interrupted.processIdentifier, SIGTERM)
        interrupted.waitUntilExit()
        #expect(interrupted.terminationStatus == 0)
        let stopped = try export(directory)
        #expect(!stopped.values.contains { $0["state"] as? String == "running" }, "a lease was not released")
        let released = stopped.values.filter { $0["state"] as? String == "available" && $0["attempts"] as? Int == 1 }
            .map { $0["job_id"] as! Int }.sorted()
        try #require(released.count == 3, "the stop did not land in the middle of a batch: \(stopped)")
        for job in released { #expect(FileManager.default.fileExists(atPath: snapshotFile(directory, job: job).path), "job \(job)") }

        // One snapshot cut inside its first frame, one whose header was edited to claim another model (its tag then
        // fails), one whose last frame is torn (a crash mid-append): that one resumes from the frame before.
        let truncated = snapshotFile(directory, job: released[0]), otherModel = snapshotFile(directory, job: released[1])
        let torn = snapshotFile(directory, job: released[2])
        let bytes = try Data(contentsOf: truncated)
        let firstFrame = try SnapshotFile.decode(bytes, path: truncated.path, limits: testLimits, key: nil).frames[0]
        try bytes.prefix(firstFrame.offset + firstFrame.fileBytes / 2).write(to: truncated)
        var foreign = try Data(contentsOf: otherModel)
        foreign[16] = foreign[16] == UInt8(ascii: "0") ? UInt8(ascii: "1") : UInt8(ascii: "0")
        try foreign.write(to: otherModel)
        let tornBytes = try Data(contentsOf: torn)
        let tornFrames = try SnapshotFile.decode(tornBytes, path: torn.path, limits: testLimits, key: nil).frames
        try #require(tornFrames.count >= 2 && tornFrames[0].kind == .full && tornFrames.dropFirst().allSatisfy { $0.kind == .append }, "\(tornFrames)")
        let lastFrame = tornFrames[tornFrames.count - 1]
        try tornBytes.prefix(lastFrame.offset + lastFrame.fileBytes - 3).write(to: torn)

        let restart = try startRun(["--batch-size", "3"], in: directory)
        restart.waitUntilExit()
        #expect(restart.terminationStatus == 0)
        let log = try String(contentsOf: directory.appendingPathComponent("run.log"), encoding: .utf8)
        #expect(log.contains("\(truncated.path) holds no complete snapshot frame: frame 1 is cut short"), "\(log)")
        #expect(log.contains("\(otherModel.path) is not authentic: its header fails its HMAC check"), "\(log)")
        #expect(log.contains("job \(released[2]): \(torn.path) is damaged from byte \(lastFrame.offset) on, frame \(tornFrames.count) is cut short"), "\(log)")
        #expect(log.contains("resuming from \(torn.path) at decode step \(tornFrames[tornFrames.count - 2].decodeSteps)"), "\(log)")
        let records = try export(directory)
        let resumed = try outputs(directory)
        for line in manifest {
            let id = line["custom_id"] as! String
            #expect(records[id]?["state"] as? String == "succeeded", "\(id)")
            #expect(resumed[id]?.0 == expected[id]?.0, "\(id): token ids differ from the uninterrupted run")
            #expect(resumed[id]?.1 == expected[id]?.1, "\(id): text differs from the uninterrupted run")
        }
        // Finished jobs leave no snapshot behind.
        #expect(try FileManager.default.contentsOfDirectory(atPath: try queueOutput(directory).appendingPathComponent("snapshots").path).isEmpty)
    }

    @Test("continuous batching: jobs of different lengths at --batch-size 3 refill freed places mid-flight, and each gets the tokens it gets at --batch-size 1")
    func continuousBatchingEqualsBatchOne() throws {
        let lengths = [5, 40, 12, 30, 8, 25, 3]
        let lines = lengths.enumerated().map { i, length -> [String: Any] in
            var line = manifest[i % manifest.count]
            line["custom_id"] = "job\(i)"
            line["max_tokens"] = length
            return line
        }
        var expected: [String: ([Int32], String)] = [:]
        for batchSize in ["1", "3"] {
            let directory = try workspace(manifest: lines)
            defer { try? FileManager.default.removeItem(at: directory) }
            let daemon = try startRun(["--batch-size", batchSize], in: directory)
            daemon.waitUntilExit()
            #expect(daemon.terminationStatus == 0)
            let results = try outputs(directory)
            #expect(results.count == lengths.count)
            if batchSize == "1" {
                expected = results
                continue
            }
            for (id, output) in results {
                #expect(output.0 == expected[id]?.0 && output.1 == expected[id]?.1, "\(id): differs from its run at batch size 1")
            }
            // Places were refilled one at a time while the others generated (not batch after batch).
            let log = try String(contentsOf: directory.appendingPathComponent("run.log"), encoding: .utf8)
            #expect(log.contains("admitted 3 jobs") && log.contains("admitted 1 job in"), "\(log)")
            #expect(log.contains("; 3 running; 1 succeeded"), "\(log)")
        }
    }

    @Test("cancelling a running job ends it cancelled at a decode step; its batch-mates succeed with their own output")
    func cancelRunningJob() throws {
        var lines = Array(manifest.prefix(3))
        lines[0]["max_tokens"] = 1500
        let directory = try workspace(manifest: lines)
        defer { try? FileManager.default.removeItem(at: directory) }
        let daemon = try startRun(["--batch-size", "3", "--snapshot-every", "10"], in: directory)
        waitFor(snapshotFile(directory, job: 1))
        let cancel = try run(["cancel", "--db", "q.sqlite", "1"], in: directory)
        #expect(cancel.status == 0, "\(cancel.standardError)")
        daemon.waitUntilExit()
        #expect(daemon.terminationStatus == 0)
        let records = try export(directory)
        #expect(records["job0"]?["state"] as? String == "cancelled")
        #expect(!FileManager.default.fileExists(atPath: snapshotFile(directory, job: 1).path))
        let results = try outputs(directory)
        for (i, line) in lines.enumerated().dropFirst() {
            let id = line["custom_id"] as! String
            #expect(records[id]?["state"] as? String == "succeeded", "\(id)")
            let alone = try run(["generate", "--model", tinyModel, "--image", line["image"] as! String, "--prompt", line["prompt"] as! String,
                                 "--max-tokens", "300", "--json"] + (i % 2 == 1 ? ["--temperature", "1.0", "--seed", "\(i)"] : []), in: directory)
            let object = try JSONSerialization.jsonObject(with: Data(alone.standardOutput.utf8)) as! [String: Any]
            #expect(results[id]?.0 == (object["token_ids"] as! [Int]).map(Int32.init), "\(id)")
        }
    }

    @Test("a snapshot of an unknown version, corrupt, or of another job (even one with the same image, prompt and parameters) restarts its job from scratch")
    func refusedAndReusedSnapshots() throws {
        let lines = (0..<3).map { i -> [String: Any] in
            var line = manifest[i]
            line["max_tokens"] = 6
            return line
        }
        let directory = try workspace(manifest: lines)
        defer { try? FileManager.default.removeItem(at: directory) }
        let first = try startRun(["--keep-kv"], in: directory)
        first.waitUntilExit()
        #expect(first.terminationStatus == 0)
        let expected = try outputs(directory)
        // Jobs 4 to 7 repeat jobs 1, 2, 3 and 1 under new custom ids.
        let again = [0, 1, 2, 0].enumerated().map { k, i -> [String: Any] in
            var line = lines[i]
            line["custom_id"] = "again\(k)"
            return line
        }
        let text = again.map { String(decoding: try! JSONSerialization.data(withJSONObject: $0, options: [.sortedKeys]), as: UTF8.self) }
        try Data((text.joined(separator: "\n") + "\n").utf8).write(to: directory.appendingPathComponent("again.jsonl"))
        try #require(try run(["enqueue", "--db", "q.sqlite", "--jsonl", "again.jsonl"], in: directory).status == 0)
        let kept = try Data(contentsOf: snapshotFile(directory, job: 1))
        var newer = kept
        newer[8] = 99
        try newer.write(to: snapshotFile(directory, job: 4))
        var damaged = kept
        damaged[damaged.count / 2] ^= 0xFF
        try damaged.write(to: snapshotFile(directory, job: 5))
        try kept.write(to: snapshotFile(directory, job: 6))  // job 1's state, but job 6 asks job 3's question
        try kept.write(to: snapshotFile(directory, job: 7))  // job 1's final state, and job 7 asks job 1's question of job 1's image

        let second = try startRun([], in: directory)
        second.waitUntilExit()
        #expect(second.terminationStatus == 0)
        let log = try String(contentsOf: directory.appendingPathComponent("run.log"), encoding: .utf8)
        let queue = try queueID(directory)
        #expect(log.contains("\(snapshotFile(directory, job: 4).path) is snapshot format version 99; this build reads version 4; starting it from scratch"), "\(log)")
        #expect(log.contains("job 5: \(snapshotFile(directory, job: 5).path)"), "\(log)")
        for job in [6, 7] {
            #expect(log.contains("job \(job): \(snapshotFile(directory, job: job).path) does not belong to this job: it was written for job 1 of queue \(queue), "
                                 + "not job \(job) of queue \(queue); starting it from scratch"), "\(log)")
        }
        #expect(!log.contains("resuming from"), "\(log)")
        let records = try export(directory)
        let results = try outputs(directory)
        for (k, i) in [0, 1, 2, 0].enumerated() {
            #expect(records["again\(k)"]?["state"] as? String == "succeeded")
            #expect(results["again\(k)"]?.0 == expected["job\(i)"]?.0 && results["again\(k)"]?.1 == expected["job\(i)"]?.1, "again\(k)")
        }
        for job in 4...7 { #expect(!FileManager.default.fileExists(atPath: snapshotFile(directory, job: job).path), "job \(job)") }
    }

    @Test("a job whose lease another worker took leaves its batch at a decode step: no result file, the row left to its new owner")
    func lostLeaseLeavesTheBatch() throws {
        var lines = Array(manifest.prefix(2))
        lines[0]["max_tokens"] = 1500
        let directory = try workspace(manifest: lines)
        defer { try? FileManager.default.removeItem(at: directory) }
        let daemon = try startRun(["--batch-size", "2", "--snapshot-every", "10", "--lease", "2s"], in: directory)
        waitFor(snapshotFile(directory, job: 1))
        // What a rescue by another worker looks like to this one.
        // A running daemon writes too (heartbeats, snapshot paths): wait for it rather than fail on a busy database.
        var configuration = Configuration()
        configuration.busyMode = .timeout(10)
        let database = try DatabaseQueue(path: directory.appendingPathComponent("q.sqlite").path, configuration: configuration)
        // (The new owner holds a fresh lease, so this worker cannot rescue the row again before it exits.)
        try database.write { try $0.execute(sql: "UPDATE job SET lease_owner = 'another-worker', lease_expires_at = lease_expires_at + 3600000 WHERE id = 1") }
        daemon.waitUntilExit()
        #expect(daemon.terminationStatus == 0)
        let log = try String(contentsOf: directory.appendingPathComponent("run.log"), encoding: .utf8)
        #expect(log.contains("job 1: its lease was lost"), "\(log)")
        let row = try database.read { try Row.fetchOne($0, sql: "SELECT state, lease_owner FROM job WHERE id = 1") }
        #expect(row?["state"] as String? == "running" && row?["lease_owner"] as String? == "another-worker")
        let results = try outputs(directory)
        #expect(results["job0"] == nil && results["job1"] != nil)
    }

    @Test("snapshot inspect lists a kept snapshot's frames and the state they make, and where a torn tail starts; a file without an intact first frame exits 65 naming it")
    func inspect() throws {
        var line = manifest[1]
        line["max_tokens"] = 5
        let directory = try workspace(manifest: [line])
        defer { try? FileManager.default.removeItem(at: directory) }
        let daemon = try startRun(["--keep-kv"], in: directory)
        daemon.waitUntilExit()
        #expect(daemon.terminationStatus == 0)
        let file = snapshotFile(directory, job: 1)
        let text = try run(["snapshot", "inspect", file.path], in: directory)
        #expect(text.status == 0, "\(text.standardError)")
        // The K/V are stored as the run's default precision keeps them: bf16 where the CPU has a bf16 instruction.
        let dtype = Precision.preferred == .bf16 ? "bf16" : "f32"
        #expect(text.standardOutput.contains("file version 4, state version 2") && text.standardOutput.contains("\(dtype), 4 layers of width 32"))
        #expect(text.standardOutput.contains("5 generated") && text.standardOutput.contains("checksums:       ok"))
        #expect(text.standardOutput.contains("  frame 1:         full, step 0, ") && text.standardOutput.contains("none: every frame is intact"), "\(text.standardOutput)")
        #expect(text.standardOutput.contains("authenticity:    not checked"), "\(text.standardOutput)")
        let authenticated = try run(["snapshot", "inspect", file.path, "--db", "q.sqlite"], in: directory)
        #expect(authenticated.status == 0 && authenticated.standardOutput.contains("authenticity:    ok"), "\(authenticated.standardOutput)")
        let json = try run(["snapshot", "inspect", file.path, "--json"], in: directory)
        let header = try JSONSerialization.jsonObject(with: Data(json.standardOutput.utf8)) as! [String: Any]
        #expect(header["layers"] as? Int == 4 && header["generated_tokens"] as? Int == 5 && header["decode_steps"] as? Int == 4)
        #expect(header["finished"] as? Bool == true && header["checksum_ok"] as? Bool == true && header["dtype"] as? String == dtype)
        #expect((header["cells_per_layer"] as? [Int])?.count == 4)
        let frames = try #require(header["frames"] as? [[String: Any]])
        #expect(frames.first?["kind"] as? String == "full" && frames.last?["last_step"] as? Int == 4 && header["damage"] == nil)
        #expect(frames.allSatisfy { $0["encoding"] as? String == "none" && ($0["stored_bytes"] as? Int ?? 0) > 0 }, "\(frames)")

        let bytes = try Data(contentsOf: file)
        let tornTail = directory.appendingPathComponent("torn.kv.zst")
        try (bytes + Data(repeating: 1, count: 50)).write(to: tornTail)
        let listed = try run(["snapshot", "inspect", tornTail.path], in: directory)
        #expect(listed.status == 0 && listed.standardOutput.contains("torn tail from byte \(bytes.count) (ignored"), "\(listed.standardOutput)")
        let cut = directory.appendingPathComponent("cut.kv.zst"), garbage = directory.appendingPathComponent("garbage.kv.zst")
        let first = try SnapshotFile.decode(bytes, path: file.path, limits: testLimits, key: nil).frames[0]
        try bytes.prefix(first.offset + first.fileBytes - 1).write(to: cut)
        try Data("not a snapshot".utf8).write(to: garbage)
        for (bad, sentence) in [(cut, "holds no complete snapshot frame"), (garbage, "is not a dllava KV snapshot")] {
            let result = try run(["snapshot", "inspect", bad.path], in: directory)
            #expect(result.status == 65)
            #expect(result.standardError.contains(bad.path) && result.standardError.contains(sentence), "\(result.standardError)")
        }
    }

    @Test("crafted snapshots (a 1 GiB zstd bomb, three 256 MiB append bombs) are refused by run and snapshot inspect before decompressing: their jobs restart from scratch, and peak memory stays within 64 MB of a run without them")
    func snapshotBombsAreRefusedCheaply() throws {
        let lines = (0..<2).map { i -> [String: Any] in
            var line = manifest[i]
            line["max_tokens"] = 6
            return line
        }
        let directory = try workspace(manifest: lines)
        defer { try? FileManager.default.removeItem(at: directory) }
        let arguments = ["run", "--db", "q.sqlite", "--model", tinyModel, "--out", "out", "--until-empty"]
        let (first, baseline) = try runDLLaVAMeasuringMemory(arguments + ["--keep-kv"], in: directory)
        #expect(first.status == 0, "\(first.standardError)")
        let expected = try outputs(directory)
        let again = lines.enumerated().map { k, line -> [String: Any] in
            var line = line
            line["custom_id"] = "again\(k)"
            return line
        }
        let text = again.map { String(decoding: try! JSONSerialization.data(withJSONObject: $0, options: [.sortedKeys]), as: UTF8.self) }
        try Data((text.joined(separator: "\n") + "\n").utf8).write(to: directory.appendingPathComponent("again.jsonl"))
        try #require(try run(["enqueue", "--db", "q.sqlite", "--jsonl", "again.jsonl"], in: directory).status == 0)

        // Jobs 3 and 4 ask what jobs 1 and 2 asked: their snapshots are job 1's and 2's headers, renamed, with bombs, all
        // tagged with the queue's secret (read from its database), so that the bounds and not the tags must refuse them.
        let secret = try #require(try DatabaseQueue(path: directory.appendingPathComponent("q.sqlite").path).read {
            try Data.fetchOne($0, sql: "SELECT secret FROM snapshot_secret")
        })
        let key = SnapshotKey(secret: secret)
        let gibibyte = 1 << 30
        func renamed(_ kept: Data, job: Int64, frames bombs: [CraftedSnapshot.Frame], keepFirstFrame: Bool) throws -> Data {
            let contents = try SnapshotFile.decode(kept, path: "kept", limits: testLimits, key: key)
            var identity = contents.identity
            identity.job = job
            let first = contents.frames[0], start = first.offset + SnapshotFile.frameHeaderSize
            let firstFrame = CraftedSnapshot.Frame(kind: 1, encoding: first.encoding.rawValue, steps: UInt64(first.decodeSteps), cells: UInt64(first.cells),
                                                   payloadBytes: UInt64(first.payloadBytes), stored: kept.subdata(in: start ..< start + first.storedBytes))
            return CraftedSnapshot.file(header: SnapshotFile.header(identity, key: key), frames: (keepFirstFrame ? [firstFrame] : []) + bombs, secret: secret)
        }
        let bomb = CraftedSnapshot.Frame(kind: 1, encoding: 1, steps: 0, cells: 0, payloadBytes: UInt64(gibibyte), stored: CraftedSnapshot.zstdZeros(count: gibibyte))
        let appendBomb = CraftedSnapshot.Frame(kind: 2, encoding: 1, steps: 1, cells: 0, payloadBytes: UInt64(gibibyte / 4),
                                               stored: CraftedSnapshot.zstdZeros(count: gibibyte / 4))
        let crafted = [3: try renamed(Data(contentsOf: snapshotFile(directory, job: 1)), job: 3, frames: [bomb], keepFirstFrame: false),
                       4: try renamed(Data(contentsOf: snapshotFile(directory, job: 2)), job: 4, frames: [appendBomb, appendBomb, appendBomb], keepFirstFrame: true)]
        for (job, bytes) in crafted {
            #expect(bytes.count < 1 << 20)
            try bytes.write(to: snapshotFile(directory, job: job))
            try bytes.write(to: directory.appendingPathComponent("crafted-\(job).kv.zst"))
        }

        let (second, peak) = try runDLLaVAMeasuringMemory(arguments, in: directory)
        #expect(second.status == 0, "\(second.standardError)")
        #expect(second.standardError.contains("\(snapshotFile(directory, job: 3).path) is refused: frame 1 declares 1073741824 bytes for 0 K/V cells"), "\(second.standardError)")
        #expect(second.standardError.contains("\(snapshotFile(directory, job: 4).path) is refused: frame 2 declares 268435456 bytes for 0 K/V cells"), "\(second.standardError)")
        #expect(!second.standardError.contains("resuming from"))
        #expect(peak < baseline + 64 << 10, "run's peak resident set: \(peak) kB, \(baseline) kB without the crafted snapshots")
        let results = try outputs(directory)
        for k in 0..<2 { #expect(results["again\(k)"]?.0 == expected["job\(k)"]?.0, "again\(k)") }

        let (valid, inspectBaseline) = try runDLLaVAMeasuringMemory(["snapshot", "inspect", snapshotFile(directory, job: 1).path])
        #expect(valid.status == 0, "\(valid.standardError)")
        for job in [3, 4] {
            let file = directory.appendingPathComponent("crafted-\(job).kv.zst").path
            for extra in [[], ["--model", tinyModel]] {
                let (inspect, inspectPeak) = try runDLLaVAMeasuringMemory(["snapshot", "inspect", file] + extra)
                #expect(inspect.status == 65 && inspect.standardError.contains("\(file) is refused: frame"), "\(extra): \(inspect.standardError)")
                #expect(inspectPeak < inspectBaseline + 64 << 10, "inspect \(extra): \(inspectPeak) kB, \(inspectBaseline) kB on a valid snapshot")
            }
        }
    }

    @Test("a snapshot whose header job id and image sha256 were rewritten to another job's is refused as not authentic, and that job starts from scratch")
    func rewrittenHeaderIsRefused() throws {
        var lines = [manifest[0], manifest[0]]
        lines[1]["custom_id"] = "other-image"
        lines[1]["image"] = sample("test_000003.png")
        for k in lines.indices { lines[k]["max_tokens"] = 6 }
        let directory = try workspace(manifest: [lines[0]])
        defer { try? FileManager.default.removeItem(at: directory) }
        let first = try startRun(["--keep-kv"], in: directory)
        first.waitUntilExit()
        #expect(first.terminationStatus == 0)
        let expected = try outputs(directory)["job0"]
        try Data(String(decoding: try JSONSerialization.data(withJSONObject: lines[1], options: [.sortedKeys]), as: UTF8.self).utf8 + [10])
            .write(to: directory.appendingPathComponent("again.jsonl"))
        try #require(try run(["enqueue", "--db", "q.sqlite", "--jsonl", "again.jsonl"], in: directory).status == 0)
        let imageSHA256 = try #require(try DatabaseQueue(path: directory.appendingPathComponent("q.sqlite").path).read {
            try String.fetchOne($0, sql: "SELECT image_sha256 FROM job WHERE id = 2")
        })
        // What someone who can write the snapshot folder but not read the database can do: job 1's file, its header
        // naming job 2 and job 2's image, every sha256 right, the tags left as they were or made with a guessed secret.
        let kept = try Data(contentsOf: snapshotFile(directory, job: 1))
        let contents = try SnapshotFile.decode(kept, path: "kept", limits: testLimits, key: nil)
        var identity = contents.identity
        identity.job = 2
        identity.imageSHA256 = imageSHA256
        let forged = SnapshotFile.header(identity, key: SnapshotKey(secret: Data(count: 32))) + kept.suffix(from: contents.frames[0].offset)
        try forged.write(to: snapshotFile(directory, job: 2))
        let inspected = try run(["snapshot", "inspect", snapshotFile(directory, job: 2).path, "--db", "q.sqlite"], in: directory)
        #expect(inspected.status == 65 && inspected.standardError.contains("is not authentic: its header fails its HMAC check"), "\(inspected.standardError)")

        let second = try startRun([], in: directory)
        second.waitUntilExit()
        #expect(second.terminationStatus == 0)
        let log = try String(contentsOf: directory.appendingPathComponent("run.log"), encoding: .utf8)
        #expect(log.contains("job 2: \(snapshotFile(directory, job: 2).path) is not authentic: its header fails its HMAC check"), "\(log)")
        #expect(!log.contains("resuming from"), "\(log)")
        #expect(try outputs(directory)["job0"]?.0 == expected?.0)
        #expect(try export(directory)["other-image"]?["state"] as? String == "succeeded")
    }
}
