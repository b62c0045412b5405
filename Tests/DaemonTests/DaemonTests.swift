// `dllava run` as cron or a user runs it: real processes on a real queue with the shipped model.
import CommandLineSupport
import Foundation
import Testing

let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../..").standardizedFileURL
let model = repository.appendingPathComponent("Jobs/models/dllava-scenes").path
func sample(_ name: String) -> String { repository.appendingPathComponent("Jobs/samples/\(name)").path }
let badImage = repository.appendingPathComponent("Tests/Fixtures/images/bad_truncated.jpg").path

func run(_ arguments: [String], in directory: URL) throws -> ProcessResult {
    try runDLLaVA(arguments, in: directory)
}

func workspace(jobs: [(String, String, String)]) throws -> URL {
    let directory = FileManager.default.temporaryDirectory.appendingPathComponent("dllava-daemon-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
    let lines = jobs.map { id, image, prompt in
        String(decoding: try! JSONSerialization.data(withJSONObject: ["custom_id": id, "image": image, "prompt": prompt, "max_tokens": 48]), as: UTF8.self)
    }
    try Data((lines.joined(separator: "\n") + "\n").utf8).write(to: directory.appendingPathComponent("jobs.jsonl"))
    try #require(try run(["init", "--db", "q.sqlite"], in: directory).status == 0)
    let enqueue = try run(["enqueue", "--db", "q.sqlite", "--jsonl", "jobs.jsonl"], in: directory)
    #expect(enqueue.status == 0 || enqueue.status == 65, "\(enqueue.standardError)")
    return directory
}

/// The queue's identity (`status --json`), which names its folder under `--out`.
func queueID(_ directory: URL) throws -> String {
    let status = try run(["status", "--db", "q.sqlite", "--json"], in: directory)
    let object = try JSONSerialization.jsonObject(with: Data(status.standardOutput.utf8)) as! [String: Any]
    return object["queue_id"] as! String
}

/// Where `run --out out` puts this queue's result files (and, under `snapshots`, its KV snapshots).
func queueOutput(_ directory: URL) throws -> URL {
    directory.appendingPathComponent("out").appendingPathComponent(try queueID(directory))
}

/// custom_id -> exported record.
func export(_ directory: URL) throws -> [String: [String: Any]] {
    let exported = try run(["export", "--db", "q.sqlite", "--format", "jsonl", "--output", "-"], in: directory)
    var records: [String: [String: Any]] = [:]
    for line in exported.standardOutput.split(separator: "\n") {
        let object = try JSONSerialization.jsonObject(with: Data(line.utf8)) as! [String: Any]
        records[object["custom_id"] as! String] = object
    }
    return records
}

@Suite("dllava run", .serialized)
struct DaemonTests {
    @Test("--until-empty processes every job: good ones succeed with their caption, a corrupt image fails with its reason")
    func processesTheQueue() throws {
        let directory = try workspace(jobs: [("a", sample("test_000000.png"), "Describe the image."),
                                             ("b", sample("test_000002.png"), "Describe the image."),
                                             ("broken", badImage, "Describe the image.")])
        defer { try? FileManager.default.removeItem(at: directory) }
        let daemon = try run(["run", "--db", "q.sqlite", "--model", model, "--out", "out", "--until-empty", "--batch-size", "3"], in: directory)
        #expect(daemon.status == 0, "\(daemon.standardError)")
        let records = try export(directory)
        #expect(records["a"]?["state"] as? String == "succeeded")
        #expect(records["b"]?["state"] as? String == "succeeded")
        #expect(records["broken"]?["state"] as? String == "failed")
        #expect((records["broken"]?["error"] as? String)?.contains("bad_truncated.jpg") == true)
        // The batched result is what `generate` gives the same image alone.
        let alone = try run(["generate", "--model", model, "--image", sample("test_000002.png"), "--prompt", "Describe the image.",
                             "--max-tokens", "48"], in: directory)
        #expect(records["b"]?["text"] as? String == alone.standardOutput.trimmingCharacters(in: .newlines))
    }

    @Test("a second run holding the same lock file exits 75 and touches nothing")
    func lockFile() throws {
        let directory = try workspace(jobs: [("a", sample("test_000001.png"), "Describe the image.")])
        defer { try? FileManager.default.removeItem(at: directory) }
        let lock = directory.appendingPathComponent("run.lock").path
        let descriptor = open(lock, O_CREAT | O_RDWR, 0o644)
        defer { close(descriptor) }
        #expect(flock(descriptor, LOCK_EX | LOCK_NB) == 0)
        let second = try run(["run", "--db", "q.sqlite", "--model", model, "--out", "out", "--until-empty", "--lock-file", lock], in: directory)
        #expect(second.status == 75)
        #expect(second.standardError.contains(lock))
        #expect(try export(directory)["a"]?["state"] as? String == "available")
    }

    @Test("kill -9 in the middle, then a restart: every job succeeds once, with the uninterrupted run's output")
    func killedAndRestarted() throws {
        let jobs = (0..<24).map { i in ("job\(i)", sample("test_00000\(i % 4).png"), i % 2 == 0 ? "Describe the image." : "How many shapes are there?") }
        // The uninterrupted reference.
        let reference = try workspace(jobs: jobs)
        defer { try? FileManager.default.removeItem(at: reference) }
        #expect(try run(["run", "--db", "q.sqlite", "--model", model, "--out", "out", "--until-empty", "--batch-size", "2"], in: reference).status == 0)
        let expected = try export(reference)

        let directory = try workspace(jobs: jobs)
        defer { try? FileManager.default.removeItem(at: directory) }
        let process = Process()
        process.executableURL = dllavaExecutable
        process.arguments = ["run", "--db", "q.sqlite", "--model", model, "--out", "out", "--until-empty", "--batch-size", "2", "--lease", "2s"]
        process.currentDirectoryURL = directory
        process.standardError = FileHandle.nullDevice
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        // Kill once some but not all jobs are done.
        let deadline = Date().addingTimeInterval(60)
        while Date() < deadline {
            Thread.sleep(forTimeInterval: 0.05)
            let done = try export(directory).values.filter { $0["state"] as? String == "succeeded" }.count
            if done >= 2 { break }
        }
        kill(process.processIdentifier, SIGKILL)
        process.waitUntilExit()
        let afterKill = try export(directory).values.filter { $0["state"] as? String == "succeeded" }.count
        #expect(afterKill < jobs.count, "the run finished before it could be killed")
        Thread.sleep(forTimeInterval: 2.5)  // the dead worker's leases expire
        let restart = try run(["run", "--db", "q.sqlite", "--model", model, "--out", "out", "--until-empty", "--batch-size", "2"], in: directory)
        #expect(restart.status == 0, "\(restart.standardError)")
        let records = try export(directory)
        for (id, _, _) in jobs {
            #expect(records[id]?["state"] as? String == "succeeded", "\(id)")
            #expect(records[id]?["text"] as? String == expected[id]?["text"] as? String, "\(id)")
        }
    }

    @Test("two runs on one database share the work: every job processed exactly once, no 'database is locked'")
    func twoRunsShareOneDatabase() throws {
        let jobs = (0..<20).map { i in ("job\(i)", sample("test_00000\(i % 4).png"), "Describe the image.") }
        let directory = try workspace(jobs: jobs)
        defer { try? FileManager.default.removeItem(at: directory) }
        var processes: [(Process, Pipe)] = []
        for _ in 0..<2 {
            let process = Process(), errors = Pipe()
            process.executableURL = dllavaExecutable
            process.arguments = ["run", "--db", "q.sqlite", "--model", model, "--out", "out", "--until-empty", "--batch-size", "2", "--threads", "1"]
            process.currentDirectoryURL = directory
            process.standardOutput = FileHandle.nullDevice
            process.standardError = errors
            try process.run()
            processes.append((process, errors))
        }
        var errorText = ""
        for (process, errors) in processes {
            errorText += String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            process.waitUntilExit()
            #expect(process.terminationStatus == 0)
        }
        #expect(!errorText.contains("locked"), "\(errorText)")
        let records = try export(directory)
        #expect(records.count == jobs.count)
        for (id, _, _) in jobs {
            #expect(records[id]?["state"] as? String == "succeeded", "\(id)")
            #expect(records[id]?["attempts"] as? Int == 1, "\(id) was claimed more than once")
        }
        // One result file per job: no attempt ran twice (snapshots live in out/<queue>/snapshots).
        let files = try FileManager.default.contentsOfDirectory(atPath: try queueOutput(directory).path)
        #expect(files.filter { $0.hasSuffix(".json.zst") }.count == jobs.count)
    }
}
