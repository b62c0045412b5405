// `dllava run` on a PostgreSQL queue: several worker processes share it and nothing else (results and snapshots live
// in the database), one is killed with SIGKILL and one stopped with SIGTERM mid-batch, and the server goes away for
// 10 s mid-run. The server is a throwaway cluster (TestPostgres).
import CommandLineSupport
import Foundation
import Testing

/// `jobs` (custom id, image, prompt; 48 tokens) enqueued into a new PostgreSQL queue (a new database on `cluster`); its
/// URL and a work folder.
func postgresWorkspace(jobs: [(String, String, String)], cluster: TestPostgres) throws -> (url: String, directory: URL) {
    try postgresWorkspace(manifest: jobs.map { id, image, prompt in ["custom_id": id, "image": image, "prompt": prompt, "max_tokens": 48] },
                          cluster: cluster)
}

/// The manifest `manifest` (one JSONL object per job) enqueued into a new PostgreSQL queue on `cluster`.
func postgresWorkspace(manifest: [[String: Any]], cluster: TestPostgres) throws -> (url: String, directory: URL) {
    let directory = FileManager.default.temporaryDirectory.appendingPathComponent("dllava-pg-daemon-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
    let lines = manifest.map { String(decoding: try! JSONSerialization.data(withJSONObject: $0, options: [.sortedKeys]), as: UTF8.self) }
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

/// Starts a worker on the queue at `url`, writing result files to `out` (none when nil: the queue's database holds
/// them); its stderr goes to `log` in `directory`.
func startWorker(url: String, in directory: URL, log: String, out: String? = "out", _ arguments: [String] = []) throws -> Process {
    let process = Process()
    process.executableURL = dllavaExecutable
    process.arguments = ["run", "--db", url, "--model", model] + (out.map { ["--out", $0] } ?? [])
        + ["--until-empty", "--batch-size", "2", "--threads", "1", "--lease", "4s"] + arguments
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
        Thread.sleep(forTimeInterval: 0.5)
    }
}

/// The uninterrupted single-worker run (SQLite) of each of the first `kinds` kinds of job of
/// `PostgresDaemonTests.manifestLine`, by "kind<i>": a job's output depends on its image, prompt and parameters alone.
func referenceOutputs(kinds: Int) throws -> [String: [String: Any]] {
    let directory = try workspace(manifest: (0..<kinds).map { PostgresDaemonTests.manifestLine($0, id: "kind\($0)") })
    defer { try? FileManager.default.removeItem(at: directory) }
    let single = try run(["run", "--db", "q.sqlite", "--model", model, "--out", "out", "--until-empty", "--batch-size", "4"], in: directory)
    try #require(single.status == 0, "\(single.standardError)")
    return try export(directory)
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

    /// Job `i` of the 200-job run: one of 4 images, 2 prompts, and greedy or seeded sampling (16 kinds of job).
    static func manifestLine(_ i: Int, id: String) -> [String: Any] {
        var line: [String: Any] = ["custom_id": id, "image": sample("test_00000\(i % 4).png"),
                                   "prompt": (i / 4) % 2 == 0 ? "Describe the image." : "How many shapes are there?", "max_tokens": 48]
        if (i / 8) % 2 == 1 {
            line["temperature"] = 0.8
            line["seed"] = 7
        }
        return line
    }

    @Test("three workers that share nothing but the connection string, 200 jobs; one killed with SIGKILL and one stopped with SIGTERM mid-batch: every job succeeds exactly once with the uninterrupted output, and jobs resume on another worker from their snapshots in the database")
    func twoHundredJobsOnWorkersThatShareOnlyTheDatabase() throws {
        let started = Date()
        let expected = try referenceOutputs(kinds: 16)
        let referenceSeconds = Date().timeIntervalSince(started)

        let count = 200
        let (url, directory) = try postgresWorkspace(manifest: (0..<count).map { Self.manifestLine($0, id: "job\($0)") }, cluster: try TestPostgres.shared())
        defer { try? FileManager.default.removeItem(at: directory) }
        // Each worker has its own result folder, or none: snapshots can only travel through the database.
        let outs: [String?] = ["out0", nil, "out2"]
        let workers = try (0..<3).map {
            try startWorker(url: url, in: directory, log: "worker\($0).log", out: outs[$0], ["--batch-size", "4", "--snapshot-every", "4"])
        }
        try waitForSuccesses(24, url: url, in: directory)
        kill(workers[0].processIdentifier, SIGKILL)
        kill(workers[1].processIdentifier, SIGTERM)
        for worker in workers { worker.waitUntilExit() }
        let logs = (0..<3).map { (try? String(contentsOf: directory.appendingPathComponent("worker\($0).log"), encoding: .utf8)) ?? "" }
        #expect(workers[1].terminationStatus == 0, "\(logs[1])")
        #expect(workers[2].terminationStatus == 0, "\(logs[2])")
        #expect(logs[1].contains("released jobs"), "\(logs[1])")
        #expect(logs[2].contains("of dead workers on this host"), "\(logs[2])")

        let records = try export(url: url, in: directory)
        #expect(records.count == count)
        for i in 0..<count {
            let record = records["job\(i)"] ?? [:]
            #expect(record["state"] as? String == "succeeded", "job\(i): \(record)")
            #expect(record["text"] as? String == expected["kind\(i % 16)"]?["text"] as? String, "job\(i)")
        }
        // Exactly once: one stored result per job, the one of the attempt its row records, and nothing else stored.
        let database = String(url.split(separator: "/").last!)
        let stored = try TestPostgres.shared().psql("""
            SELECT count(*), count(DISTINCT r.job_id), count(*) FILTER (WHERE r.attempt = j.attempt AND r.sha256 = j.output_sha256),
                   (SELECT count(*) FROM dllava.snapshot)
            FROM dllava.result r JOIN dllava.job j ON j.id = r.job_id
            """, database: database)
        #expect(stored.trimmingCharacters(in: .whitespacesAndNewlines) == "\(count)|\(count)|\(count)|0", "\(stored)")

        // Jobs resumed from a snapshot another worker stored (the stopped worker's released batch, the killed worker's
        // periodic snapshots) have exactly the uninterrupted output.
        let listed = try run(["list", "--db", url, "--json", "--limit", "1000"], in: directory)
        var customIDs: [Int64: String] = [:]
        for line in listed.standardOutput.split(separator: "\n") {
            let object = try JSONSerialization.jsonObject(with: Data(line.utf8)) as! [String: Any]
            customIDs[(object["id"] as! NSNumber).int64Value] = object["custom_id"] as? String
        }
        let resumed = logs[2].split(separator: "\n").compactMap { line -> Int64? in
            guard let range = line.range(of: "resuming from the snapshot of job ") else { return nil }
            return Int64(line[range.upperBound...].prefix { $0.isNumber })
        }
        #expect(!resumed.isEmpty, "\(logs[2])")
        for id in resumed {
            let custom = try #require(customIDs[id])
            let i = Int(custom.dropFirst("job".count))!
            #expect(records[custom]?["text"] as? String == expected["kind\(i % 16)"]?["text"] as? String, "\(custom) resumed")
        }
        // Result files exist only where the worker that finished the job was told to write them.
        let paths = try listed.standardOutput.split(separator: "\n").compactMap {
            (try JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any])?["output_path"] as? String
        }
        #expect(!paths.isEmpty && paths.allSatisfy { FileManager.default.fileExists(atPath: $0) && ($0.contains("/out0/") || $0.contains("/out2/")) })
        let status = try run(["status", "--db", url, "--json"], in: directory)
        #expect(status.status == 0 && !status.standardOutput.contains("\"orphaned\":[{"), "\(status.standardOutput)")
        print("200-job PostgreSQL process test: reference \(Int(referenceSeconds)) s, total \(Int(Date().timeIntervalSince(started))) s; "
              + "\(resumed.count) jobs resumed from stored snapshots")
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
