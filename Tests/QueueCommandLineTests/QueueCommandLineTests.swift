// The queue commands as a user or cron runs them: a real `dllava` process on a real database file, a report on
// stdout, one sentence per problem on stderr, sysexits codes.
import Artifacts
import CommandLineSupport
import Foundation
import GRDB
import JobQueue
import Testing

/// A scratch folder with a database path, images and manifests, and a way to run `dllava` in it.
struct Workspace {
    let directory: URL

    init() throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("dllava-cli-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
    }

    func remove() { try? FileManager.default.removeItem(at: directory) }

    var database: String { directory.appendingPathComponent("queue.sqlite").path }

    @discardableResult
    func file(_ name: String, _ contents: String) throws -> URL {
        let url = directory.appendingPathComponent(name)
        try FileManager.default.createDirectory(at: url.deletingLastPathComponent(), withIntermediateDirectories: true)
        try Data(contents.utf8).write(to: url)
        return url
    }

    /// Runs `dllava` in the workspace folder with `$DLLAVA_DB` unset unless given.
    func run(_ arguments: [String], environment: [String: String] = [:]) throws -> ProcessResult {
        var base = ProcessInfo.processInfo.environment
        base["DLLAVA_DB"] = nil
        return try runDLLaVA(arguments, in: directory, environment: base.merging(environment) { $1 })
    }

    /// Runs `dllava COMMAND --db <database> ...`.
    func queue(_ command: String, _ arguments: String...) throws -> ProcessResult {
        try run([command, "--db", database] + arguments)
    }

    /// Three images and a JSONL manifest with one bad line (line 3: missing image).
    func standardManifest() throws -> URL {
        try file("images/a.jpg", "image a")
        try file("images/b.jpg", "image b")
        try file("images/c.png", "image c")
        return try file("jobs.jsonl", """
            {"custom_id": "a", "image": "images/a.jpg", "prompt": "Describe.", "max_tokens": 8}
            {"custom_id": "b", "image": "images/b.jpg", "prompt": "Describe, \\"briefly\\"."}
            {"custom_id": "missing", "image": "images/none.jpg", "prompt": "Describe."}
            {"custom_id": "c", "image": "images/c.png", "prompt": "Describe."}
            """)
    }
}

struct Stats: Codable, Sendable { var decode_ms: Double }

@Suite("dllava queue commands")
struct QueueCommandLineTests {
    @Test func enqueueReportsBadLinesWithExit65AndQueuesTheRest() throws {
        let workspace = try Workspace()
        defer { workspace.remove() }
        #expect(try workspace.queue("init").status == 0)
        let manifest = try workspace.standardManifest()
        let run = try workspace.queue("enqueue", "--jsonl", manifest.path, "--temperature", "0.5")
        #expect(run.status == 65)
        #expect(run.standardOutput == "enqueued 3 jobs from \(manifest.path)\n")
        #expect(run.errorLines == [
            "dllava: \(manifest.path):3: image \(workspace.directory.appendingPathComponent("images/none.jpg").path) not found",
            "dllava: \(manifest.path): 1 bad line skipped (see above)",
        ])
        // Again: nothing new, same report.
        let again = try workspace.queue("enqueue", "--jsonl", manifest.path, "--temperature", "0.5")
        #expect(again.status == 65 && again.standardOutput == "enqueued 0 jobs from \(manifest.path) (3 already queued)\n")
        let queue = try SQLiteJobQueue(path: workspace.database)
        #expect(try queue.job(customID: "a")?.parameters == JobParameters(maxTokens: 8, temperature: 0.5))
        #expect(try queue.counts()[.available] == 3)
    }

    @Test func enqueueFromAFolderAndFromCSV() throws {
        let workspace = try Workspace()
        defer { workspace.remove() }
        #expect(try workspace.queue("init").status == 0)
        _ = try workspace.standardManifest()
        let folder = try workspace.queue("enqueue", "--folder", "images", "--prompt", "Caption.", "--priority", "2", "--json")
        #expect(folder.status == 0, "\(folder.standardError)")
        #expect(folder.standardOutput == #"{"already_present":0,"bad_lines":[],"inserted":3,"source":"images"}"# + "\n")
        let csv = try workspace.file("jobs.csv", "custom_id,image,prompt,seed\nx,images/a.jpg,\"Say \"\"x\"\", then stop.\",5\n")
        let run = try workspace.queue("enqueue", "--csv", csv.path)
        #expect(run.status == 0 && run.standardOutput == "enqueued 1 job from \(csv.path)\n")
        let queue = try SQLiteJobQueue(path: workspace.database)
        #expect(try queue.job(customID: "x")?.prompt == "Say \"x\", then stop.")
        #expect(try queue.list().prefix(3).allSatisfy { $0.priority == 2 && $0.prompt == "Caption." })
    }

    @Test func usageErrorsExit64() throws {
        let workspace = try Workspace()
        defer { workspace.remove() }
        #expect(try workspace.queue("init").status == 0)
        for arguments in [
            ["enqueue", "--jsonl", "a.jsonl", "--csv", "b.csv"],
            ["enqueue", "--folder", "images"],
            ["enqueue", "--jsonl", "a.jsonl", "--top-p", "2"],
            ["cancel"],
            ["cancel", "--all", "--state", "running"],
            ["retry"],
            ["prune", "--older-than", "7 days"],
            ["list", "--state", "finished"],
            ["export", "--format", "xml", "--output", "x"],
        ] {
            let run = try workspace.run([arguments[0], "--db", workspace.database] + arguments.dropFirst())
            #expect(run.status == 64, "\(arguments): \(run.standardError)")
        }
        // Nothing was cancelled by the refused `cancel`.
        #expect(try SQLiteJobQueue(path: workspace.database).counts().values.reduce(0, +) == 0)
    }

    @Test func aMissingOrForeignDatabaseIsAConfigurationError() throws {
        let workspace = try Workspace()
        defer { workspace.remove() }
        let missing = try workspace.queue("status")
        #expect(missing.status == 78)
        #expect(missing.errorLines == ["dllava: no queue database at \(workspace.database): create it with `dllava init --db \(workspace.database)`"])
        #expect(!FileManager.default.fileExists(atPath: workspace.database))
        try workspace.file("queue.sqlite", "this is not a database, just text long enough to fill a header....................")
        let foreign = try workspace.queue("list")
        #expect(foreign.status == 78)
        #expect(foreign.errorLines.count == 1 && foreign.standardError.contains(workspace.database))
    }

    @Test func aBusyDatabaseExits75() throws {
        let workspace = try Workspace()
        defer { workspace.remove() }
        #expect(try workspace.queue("init").status == 0)
        let manifest = try workspace.standardManifest()
        let holder = try DatabaseQueue(path: workspace.database)
        let run = try holder.writeWithoutTransaction { db in
            try db.execute(sql: "BEGIN IMMEDIATE")
            defer { try? db.execute(sql: "ROLLBACK") }
            return try workspace.run(["enqueue", "--db", workspace.database, "--busy-timeout", "0.2", "--jsonl", manifest.path])
        }
        #expect(run.status == 75, "\(run.standardError)")
        #expect(run.errorLines.last == "dllava: the queue database \(workspace.database) is busy (another process held it too long); try again")
    }

    @Test func theDatabaseDefaultsToDLLAVA_DBThenTheWorkingDirectory() throws {
        let workspace = try Workspace()
        defer { workspace.remove() }
        let fromEnvironment = workspace.directory.appendingPathComponent("env.sqlite").path
        #expect(try workspace.run(["init"], environment: ["DLLAVA_DB": fromEnvironment]).status == 0)
        #expect(FileManager.default.fileExists(atPath: fromEnvironment))
        let local = try workspace.run(["init"])
        #expect(local.status == 0 && local.standardOutput == "created dllava.sqlite (schema v5-snapshot-secret)\n")
        #expect(FileManager.default.fileExists(atPath: workspace.directory.appendingPathComponent("dllava.sqlite").path))
    }

    @Test func statusListAndShowReportTheQueue() throws {
        let workspace = try Workspace()
        defer { workspace.remove() }
        #expect(try workspace.queue("init").status == 0)
        _ = try workspace.queue("enqueue", "--jsonl", workspace.standardManifest().path)
        let queue = try SQLiteJobQueue(path: workspace.database)
        let claimed = try queue.claim(owner: "test", limit: 1, leaseDuration: 60_000)
        _ = try queue.complete(job: claimed[0].id, attempt: 1, owner: "test", output: JobOutput(path: "/nowhere", sha256: "x"))

        let status = try workspace.queue("status", "--json")
        #expect(status.status == 0)
        struct Status: Decodable { let counts: [String: Int]; let total: Int; let remaining: Int; let jobs_per_hour: Double?; let eta_ms: Int64? }
        let decoded = try JSONDecoder().decode(Status.self, from: Data(status.standardOutput.utf8))
        #expect(decoded.counts["available"] == 2 && decoded.counts["succeeded"] == 1 && decoded.total == 3 && decoded.remaining == 2)
        #expect(decoded.jobs_per_hour != nil && decoded.eta_ms != nil)
        let text = try workspace.queue("status")
        #expect(text.standardOutput.contains("  succeeded  1\n") && text.standardOutput.contains("remaining  2, eta "))

        let list = try workspace.queue("list", "--state", "available")
        #expect(list.standardOutput.split(separator: "\n").count == 3)
        let listJSON = try workspace.queue("list", "--json", "--limit", "1", "--after", "1")
        #expect(listJSON.standardOutput.split(separator: "\n").count == 1 && listJSON.standardOutput.contains(#""custom_id":"b""#))

        let show = try workspace.queue("show", "--custom-id", "a")
        #expect(show.status == 0 && show.standardOutput.contains("state            succeeded\n"))
        let showMissing = try workspace.queue("show", "99")
        #expect(showMissing.status == 65 && showMissing.errorLines == ["dllava: no job 99 in \(workspace.database)"])
    }

    @Test func cancelAndRetryByFilter() throws {
        let workspace = try Workspace()
        defer { workspace.remove() }
        #expect(try workspace.queue("init").status == 0)
        _ = try workspace.queue("enqueue", "--jsonl", workspace.standardManifest().path)
        let queue = try SQLiteJobQueue(path: workspace.database)
        let running = try queue.claim(owner: "test", limit: 1, leaseDuration: 60_000)[0]

        let byID = try workspace.queue("cancel", "\(running.id + 1)")
        #expect(byID.standardOutput == "cancelled 1 queued job; asked 0 running jobs to stop\n")
        let all = try workspace.queue("cancel", "--all")
        #expect(all.standardOutput == "cancelled 1 queued job; asked 1 running job to stop\n")
        #expect(try queue.job(id: running.id)?.cancelRequested == true)
        #expect(try queue.acknowledgeCancel(job: running.id, attempt: running.attempt, owner: "test"))

        let retry = try workspace.queue("retry", "--state", "cancelled", "--custom-id", "a", "--attempts", "2")
        #expect(retry.status == 0 && retry.standardOutput == "requeued 1 job\n")
        let a = try #require(try queue.job(customID: "a"))
        #expect(a.state == .available && a.attempt == 1 && a.maxAttempts == 3)
        #expect(try workspace.queue("retry", "--state", "cancelled").standardOutput == "requeued 2 jobs\n")
    }

    @Test func exportWritesOneRecordPerJobWithTextOrError() throws {
        let workspace = try Workspace()
        defer { workspace.remove() }
        #expect(try workspace.queue("init").status == 0)
        _ = try workspace.queue("enqueue", "--jsonl", workspace.standardManifest().path)
        let queue = try SQLiteJobQueue(path: workspace.database)
        let jobs = try queue.claim(owner: "test", limit: 3, leaseDuration: 60_000)
        let results = try ResultFile(directory: workspace.directory.appendingPathComponent("out"))
        // a succeeds with a multi-line, comma-holding caption; b fails permanently; c stays running.
        let record = ResultRecord(queueID: queue.identity, jobID: jobs[0].id, attempt: jobs[0].attempt, customID: jobs[0].customID,
                                  text: "A cat,\nsitting \"still\".", tokenIDs: [1, 2], finishReason: "stop",
                                  parameters: jobs[0].parameters, stats: Stats(decode_ms: 1),
                                  model: ModelFingerprint(fingerprint: "f"), timings: ResultTimings(startedAt: 1, finishedAt: 2))
        let written = try results.write(record)
        #expect(try queue.complete(job: jobs[0].id, attempt: jobs[0].attempt, owner: "test",
                                   output: JobOutput(path: written.url.path, sha256: written.sha256)))
        _ = try queue.fail(job: jobs[1].id, attempt: jobs[1].attempt, owner: "test", error: "images/b.jpg is not a JPEG", permanent: true)

        let jsonl = try workspace.queue("export", "--format", "jsonl", "--output", "all.jsonl")
        #expect(jsonl.status == 0, "\(jsonl.standardError)")
        let lines = try String(contentsOf: workspace.directory.appendingPathComponent("all.jsonl"), encoding: .utf8)
            .split(separator: "\n").map { try JSONSerialization.jsonObject(with: Data($0.utf8)) as! [String: Any] }
        #expect(lines.count == 3)
        #expect(lines[0]["custom_id"] as? String == "a" && lines[0]["state"] as? String == "succeeded")
        #expect(lines[0]["text"] as? String == "A cat,\nsitting \"still\"." && lines[0]["attempts"] as? Int == 1)
        #expect(lines[0]["error"] == nil && lines[0]["finish_reason"] as? String == "stop")
        #expect(lines[1]["custom_id"] as? String == "b" && lines[1]["error"] as? String == "images/b.jpg is not a JPEG")
        #expect(lines[1]["text"] == nil && lines[2]["state"] as? String == "running")

        let csv = try workspace.queue("export", "--state", "succeeded", "--state", "failed", "--output", "done.csv")
        #expect(csv.status == 0)
        let csvText = try String(contentsOf: workspace.directory.appendingPathComponent("done.csv"), encoding: .utf8)
        #expect(csvText == """
            custom_id,job_id,state,attempts,image,finish_reason,text,error\r
            a,1,succeeded,1,\(jobs[0].imagePath),stop,"A cat,
            sitting ""still"".",\r
            b,2,failed,1,\(jobs[1].imagePath),,,images/b.jpg is not a JPEG\r

            """)

        // A result file that no longer matches its checksum: the record carries the error, exit 65.
        try Data("tampered".utf8).write(to: written.url)
        let tampered = try workspace.queue("export", "--state", "succeeded", "--output", "-")
        #expect(tampered.status == 65)
        #expect(tampered.standardOutput.contains(#""error":"job 1: "# ) && tampered.standardOutput.contains("not the recorded"))
        #expect(tampered.errorLines.count == 2 && tampered.errorLines[0].hasPrefix("dllava: job 1: \(written.url.path) has sha256 "))
    }

    @Test func pruneDeletesOldFinishedJobsAndOptionallyTheirResultsAndSnapshots() throws {
        let workspace = try Workspace()
        defer { workspace.remove() }
        #expect(try workspace.queue("init").status == 0)
        _ = try workspace.queue("enqueue", "--jsonl", workspace.standardManifest().path)
        let queue = try SQLiteJobQueue(path: workspace.database)
        let job = try queue.claim(owner: "test", limit: 1, leaseDuration: 60_000)[0]
        let output = try workspace.file("out/q/1-1.json.zst", "x")
        let snapshot = try workspace.file("out/q/snapshots/job-1.kv.zst", "kept")
        try queue.recordSnapshotPath(job: job.id, path: snapshot.path)
        _ = try queue.complete(job: job.id, attempt: job.attempt, owner: "test", output: JobOutput(path: output.path, sha256: "x"))
        let young = try workspace.queue("prune", "--older-than", "1h")
        #expect(young.status == 0 && young.standardOutput == "deleted 0 finished jobs older than 1h\n")
        Thread.sleep(forTimeInterval: 0.01)
        let old = try workspace.queue("prune", "--older-than", "1ms", "--delete-outputs")
        #expect(old.status == 0 && old.standardOutput == "deleted 1 finished job older than 1ms and 1 result file and 1 snapshot\n")
        #expect(!FileManager.default.fileExists(atPath: output.path) && !FileManager.default.fileExists(atPath: snapshot.path))
        #expect(try queue.counts().values.reduce(0, +) == 2)
    }

    @Test func exportRefusesTheDatabaseItsWALAndSHMAndNonRegularFiles() throws {
        let workspace = try Workspace()
        defer { workspace.remove() }
        #expect(try workspace.queue("init").status == 0)
        _ = try workspace.queue("enqueue", "--jsonl", workspace.standardManifest().path)
        let before = try Data(contentsOf: URL(fileURLWithPath: workspace.database))
        // An open connection keeps the -wal and -shm files in place.
        let holder = try DatabasePool(path: workspace.database)
        _ = try holder.read { try Int.fetchOne($0, sql: "SELECT COUNT(*) FROM job") }
        let alias = workspace.directory.appendingPathComponent("alias.sqlite").path
        #expect(link(workspace.database, alias) == 0)
        for (output, named) in [(workspace.database, workspace.database), ("queue.sqlite", "queue.sqlite"), (alias, alias),
                                (workspace.database + "-wal", workspace.database + "-wal"), (workspace.database + "-shm", workspace.database + "-shm")] {
            let run = try workspace.queue("export", "--output", output)
            #expect(run.status == 64, "\(output): \(run.standardError)")
            #expect(run.errorLines.count == 1 && run.standardError.contains("--output \(named) is the queue database"), "\(run.standardError)")
        }
        try holder.close()
        #expect(try Data(contentsOf: URL(fileURLWithPath: workspace.database)) == before)
        #expect(try SQLiteJobQueue(path: workspace.database).counts()[.available] == 3)

        let fifo = workspace.directory.appendingPathComponent("pipe.jsonl").path
        #expect(mkfifo(fifo, 0o644) == 0)
        let folder = workspace.directory.appendingPathComponent("images").path
        for (output, kind) in [(fifo, "a FIFO"), (folder, "a folder")] {
            let run = try workspace.queue("export", "--output", output)
            #expect(run.status == 64 && run.errorLines == ["dllava: --output \(output) is \(kind), not a regular file; nothing was written there"],
                    "\(run.standardError)")
        }
        var status = stat()
        #expect(stat(fifo, &status) == 0 && status.st_mode & S_IFMT == S_IFIFO)
        // A regular file is replaced as before.
        try workspace.file("old.jsonl", "old")
        #expect(try workspace.queue("export", "--output", "old.jsonl").status == 0)
    }

    @Test func aFIFONamedLikeAnImageIsSkippedWithAMessageNotWaitedOn() throws {
        let workspace = try Workspace()
        defer { workspace.remove() }
        #expect(try workspace.queue("init").status == 0)
        try workspace.file("images/a.jpg", "image a")
        let fifo = workspace.directory.appendingPathComponent("images/x.png").path
        #expect(mkfifo(fifo, 0o644) == 0)
        try workspace.file("fifo.jsonl", #"{"custom_id": "x", "image": "images/x.png", "prompt": "Describe."}"# + "\n")
        for arguments in [["--folder", "images", "--prompt", "Describe."], ["--jsonl", "fifo.jsonl"]] {
            // Run with a deadline: a build that opens the FIFO would wait for a writer forever.
            let process = Process(), errors = Pipe()
            process.executableURL = dllavaExecutable
            process.arguments = ["enqueue", "--db", workspace.database] + arguments
            process.currentDirectoryURL = workspace.directory
            process.standardOutput = FileHandle.nullDevice
            process.standardError = errors
            try process.run()
            let deadline = Date().addingTimeInterval(30)
            while process.isRunning && Date() < deadline { Thread.sleep(forTimeInterval: 0.05) }
            if process.isRunning {
                kill(process.processIdentifier, SIGKILL)
                process.waitUntilExit()
                Issue.record("enqueue \(arguments) hung on the FIFO")
                continue
            }
            let text = String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            #expect(process.terminationStatus == 65, "\(text)")
            #expect(text.contains("image \(fifo) is not a regular file (a FIFO, socket or device); skipped"), "\(text)")
        }
        let queue = try SQLiteJobQueue(path: workspace.database)
        #expect(try queue.list().map(\.imagePath) == [workspace.directory.appendingPathComponent("images/a.jpg").path])
    }

    @Test func aLeaseTooShortToOutliveAHeartbeatIsRefusedBeforeAnythingIsClaimed() throws {
        let workspace = try Workspace()
        defer { workspace.remove() }
        #expect(try workspace.queue("init").status == 0)
        _ = try workspace.queue("enqueue", "--jsonl", workspace.standardManifest().path)
        for lease in ["1ms", "1s", "1999ms"] {
            let run = try workspace.run(["run", "--db", workspace.database, "--model", "/no/model", "--out", "out", "--until-empty", "--lease", lease])
            #expect(run.status == 64, "\(lease): \(run.standardError)")
            #expect(run.standardError.contains("--lease \(lease) is too short: a lease must be at least 2s"), "\(run.standardError)")
        }
        #expect(try SQLiteJobQueue(path: workspace.database).counts()[.available] == 3)
    }

    @Test func aForeignOrEmptyDatabaseIsRefusedWith78AndLeftUnchanged() throws {
        let workspace = try Workspace()
        defer { workspace.remove() }
        let foreign = try DatabaseQueue(path: workspace.database)
        try foreign.write { try $0.execute(sql: "CREATE TABLE notes (text TEXT); INSERT INTO notes VALUES ('mine')") }
        try foreign.close()
        let before = try Data(contentsOf: URL(fileURLWithPath: workspace.database))
        let manifest = try workspace.standardManifest()
        for arguments in [["status"], ["list"], ["show", "1"], ["export", "--output", "-"], ["cancel", "--all"], ["retry", "--state", "failed"],
                          ["prune", "--older-than", "1d"], ["enqueue", "--jsonl", manifest.path], ["init"]] {
            let run = try workspace.run([arguments[0], "--db", workspace.database] + arguments.dropFirst())
            #expect(run.status == 78, "\(arguments): \(run.standardError)")
            #expect(run.errorLines == ["dllava: \(workspace.database) is not a dllava queue database (it has no job table); it was left unchanged"],
                    "\(arguments)")
        }
        #expect(try Data(contentsOf: URL(fileURLWithPath: workspace.database)) == before)
        let tables = try DatabaseQueue(path: workspace.database).read { try String.fetchAll($0, sql: "SELECT name FROM sqlite_master") }
        #expect(tables == ["notes"])

        // A 0-byte file: read commands refuse it and leave it empty; `init` makes it a queue.
        let empty = workspace.directory.appendingPathComponent("empty.sqlite").path
        #expect(FileManager.default.createFile(atPath: empty, contents: Data()))
        let status = try workspace.run(["status", "--db", empty])
        #expect(status.status == 78 && status.errorLines == ["dllava: \(empty) is not a dllava queue database (it is an empty database); it was left unchanged"])
        #expect(try FileManager.default.attributesOfItem(atPath: empty)[.size] as? Int == 0)
        #expect(try workspace.run(["init", "--db", empty]).status == 0)
        #expect(try workspace.run(["status", "--db", empty]).status == 0)
    }

    @Test func readCommandsNeverWriteToTheQueue() throws {
        let workspace = try Workspace()
        defer { workspace.remove() }
        #expect(try workspace.queue("init").status == 0)
        _ = try workspace.queue("enqueue", "--jsonl", workspace.standardManifest().path)
        let before = try Data(contentsOf: URL(fileURLWithPath: workspace.database))
        let modified = try FileManager.default.attributesOfItem(atPath: workspace.database)[.modificationDate] as? Date
        for arguments in [["status"], ["status", "--json"], ["list"], ["show", "1"], ["export", "--output", "-"]] {
            let run = try workspace.run([arguments[0], "--db", workspace.database] + arguments.dropFirst())
            #expect(run.status == 0, "\(arguments): \(run.standardError)")
        }
        #expect(try Data(contentsOf: URL(fileURLWithPath: workspace.database)) == before)
        #expect(try FileManager.default.attributesOfItem(atPath: workspace.database)[.modificationDate] as? Date == modified)
    }
}
