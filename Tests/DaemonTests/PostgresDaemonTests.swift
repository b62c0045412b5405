// `dllava run` on a PostgreSQL queue: several worker processes share it, one is killed with SIGKILL and one stopped
// with SIGTERM mid-batch, and the server goes away for 10 s mid-run. The server is a throwaway cluster (TestPostgres).
import CommandLineSupport
import Foundation
import Testing

/// `lines` enqueued into a new PostgreSQL queue (a new database on `cluster`); its URL and a work folder.
func postgresWorkspace(jobs: [(String, String, String)], cluster: TestPostgres) throws -> (url: String, directory: URL) {
    let directory = FileManager.default.temporaryDirectory.appendingPathComponent("dllava-pg-daemon-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
    let lines = jobs.map { id, image, prompt in
        String(decoding: try! JSONSerialization.data(withJSONObject: ["custom_id": id, "image": image, "prompt": prompt, "max_tokens": 48]), as: UTF8.self)
    }
    try Data((lines.joined(separator: "\n") + "\n").utf8).write(to: directory.appendingPathComponent("jobs.jsonl"))
    let url = try cluster.createDatabase()
    let initialised = try run(["init", "--db", url], in: directory)
    try #require(initialised.status == 0, "\(initialised.standardError)")
    let enqueue = try run(["enqueue", "--db", url, "--jsonl", "jobs.jsonl"], in: directory)
    try #require(enqueue.status == 0, "\(enqueue.standardError)")
    return (url, directory)
}

/// custom_id -> exported record of the queue at `url`.
func export(url: String, in directory: URL) throws -> [String: [String: Any]] {
    let exported = try run(["export", "--db", url, "--format", "jsonl", "--output", "-"], in: directory)
    var records: [String: [String: Any]] = [:]
    for line in exported.standardOutput.split(separator: "\n") {
        let object = try JSONSerialization.jsonObject(with: Data(line.utf8)) as! [String: Any]
        records[object["custom_id"] as! String] = object
    }
    return records
}

/// Starts a worker on the queue at `url`; its stderr goes to `log` in `directory`.
func startWorker(url: String, in directory: URL, log: String, _ arguments: [String] = []) throws -> Process {
    let process = Process()
    process.executableURL = dllavaExecutable
    process.arguments = ["run", "--db", url, "--model", model, "--out", "out", "--until-empty", "--batch-size", "2", "--threads", "1",
                         "--lease", "4s"] + arguments
    process.currentDirectoryURL = directory
    process.standardOutput = FileHandle.nullDevice
    let file = directory.appendingPathComponent(log)
    _ = FileManager.default.createFile(atPath: file.path, contents: nil)
    process.standardError = try FileHandle(forWritingTo: file)
    try process.run()
    return process
}

/// Waits (up to `seconds`, a safety net rather than a timing) until `count` jobs of the queue succeeded.
func waitForSuccesses(_ count: Int, url: String, in directory: URL, seconds: Double = 120) throws {
    let deadline = Date().addingTimeInterval(seconds)
    while Date() < deadline {
        if try export(url: url, in: directory).values.filter({ $0["state"] as? String == "succeeded" }).count >= count { return }
        Thread.sleep(forTimeInterval: 0.1)
    }
}

@Suite("dllava run on PostgreSQL", .serialized)
struct PostgresDaemonTests {
    let jobs = (0..<30).map { i in ("job\(i)", sample("test_00000\(i % 4).png"), i % 2 == 0 ? "Describe the image." : "How many shapes are there?") }

    /// The uninterrupted single-worker run on SQLite: what every job's caption must be.
    func reference() throws -> [String: [String: Any]] {
        let directory = try workspace(jobs: jobs)
        defer { try? FileManager.default.removeItem(at: directory) }
        let single = try run(["run", "--db", "q.sqlite", "--model", model, "--out", "out", "--until-empty", "--batch-size", "2"], in: directory)
        #expect(single.status == 0, "\(single.standardError)")
        return try export(directory)
    }

    @Test("three workers share a PostgreSQL queue; one killed with SIGKILL and one stopped with SIGTERM mid-run: every job succeeds once with the uninterrupted output")
    func threeWorkersOneKilledOneStopped() throws {
        let expected = try reference()
        let (url, directory) = try postgresWorkspace(jobs: jobs, cluster: try TestPostgres.shared())
        defer { try? FileManager.default.removeItem(at: directory) }
        let workers = try (0..<3).map { try startWorker(url: url, in: directory, log: "worker\($0).log") }
        try waitForSuccesses(4, url: url, in: directory)
        kill(workers[0].processIdentifier, SIGKILL)
        kill(workers[1].processIdentifier, SIGTERM)
        for worker in workers { worker.waitUntilExit() }
        let logs = (0..<3).map { (try? String(contentsOf: directory.appendingPathComponent("worker\($0).log"), encoding: .utf8)) ?? "" }
        #expect(workers[1].terminationStatus == 0, "\(logs[1])")
        #expect(workers[2].terminationStatus == 0, "\(logs[2])")
        // The stopped worker handed its batch back with snapshots; the survivor took the killed worker's jobs at once
        // (same host, dead pid) and resumed the stopped worker's from their snapshots.
        #expect(logs[1].contains("released jobs"), "\(logs[1])")
        #expect(logs[2].contains("resuming from"), "\(logs[2])")
        #expect(logs[2].contains("of dead workers on this host"), "\(logs[2])")
        let records = try export(url: url, in: directory)
        #expect(records.count == jobs.count)
        for (id, _, _) in jobs {
            #expect(records[id]?["state"] as? String == "succeeded", "\(id): \(records[id] ?? [:])")
            #expect(records[id]?["text"] as? String == expected[id]?["text"] as? String, "\(id)")
        }
        // One recorded result file per job, each its own.
        let listed = try run(["list", "--db", url, "--json", "--limit", "1000"], in: directory)
        let outputs = try listed.standardOutput.split(separator: "\n").compactMap {
            (try JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any])?["output_path"] as? String
        }
        #expect(outputs.count == jobs.count && Set(outputs).count == jobs.count, "\(outputs)")
        let status = try run(["status", "--db", url, "--json"], in: directory)
        #expect(status.status == 0 && !status.standardOutput.contains("\"orphaned\":[{"), "\(status.standardOutput)")
    }

    @Test("the server stops for 10 s mid-run: the worker says so, reconnects when it is back, and every job succeeds with the uninterrupted output")
    func workerRidesOutAServerOutage() throws {
        let expected = try reference()
        let cluster = try TestPostgres.startDedicated()
        defer { cluster.stop() }
        let subset = Array(jobs.prefix(12))
        let (url, directory) = try postgresWorkspace(jobs: subset, cluster: cluster)
        defer { try? FileManager.default.removeItem(at: directory) }
        let worker = try startWorker(url: url, in: directory, log: "worker.log", ["--busy-timeout", "60"])
        try waitForSuccesses(2, url: url, in: directory)
        try cluster.stopServer()
        Thread.sleep(forTimeInterval: 10)
        try cluster.startServer()
        worker.waitUntilExit()
        let log = (try? String(contentsOf: directory.appendingPathComponent("worker.log"), encoding: .utf8)) ?? ""
        #expect(worker.terminationStatus == 0, "\(log)")
        #expect(log.contains("lost the connection to postgres://dllava@127.0.0.1:\(cluster.port)/"), "\(log)")
        #expect(log.contains("reconnected to"), "\(log)")
        let records = try export(url: url, in: directory)
        for (id, _, _) in subset {
            #expect(records[id]?["state"] as? String == "succeeded", "\(id): \(records[id] ?? [:])")
            #expect(records[id]?["text"] as? String == expected[id]?["text"] as? String, "\(id)")
        }
    }
}
