// The queue commands with `--db postgres://...` (and `DLLAVA_DB`), on the throwaway test server (TestPostgres).
import Artifacts
import CommandLineSupport
import Foundation
import JobQueue
import Testing

@Suite("dllava queue commands on PostgreSQL")
struct PostgresCommandLineTests {
    @Test func everyQueueCommandTakesAPostgresURL() throws {
        let workspace = try Workspace()
        defer { workspace.remove() }
        let url = try TestPostgres.shared().createDatabase()
        let location = url  // no password: printed as given
        func queue(_ command: String, _ arguments: String...) throws -> ProcessResult { try workspace.run([command, "--db", url] + arguments) }

        let created = try queue("init")
        #expect(created.status == 0 && created.standardOutput == "\(location) is ready (schema v6-claim-by-image)\n", "\(created.standardError)")
        let manifest = try workspace.standardManifest()
        let enqueue = try queue("enqueue", "--jsonl", manifest.path)
        #expect(enqueue.status == 65 && enqueue.standardOutput == "enqueued 3 jobs from \(manifest.path)\n")
        #expect(try queue("enqueue", "--jsonl", manifest.path).standardOutput == "enqueued 0 jobs from \(manifest.path) (3 already queued)\n")
        // DLLAVA_DB names the queue when --db is not given.
        let status = try workspace.run(["status", "--json"], environment: ["DLLAVA_DB": url])
        #expect(status.status == 0 && status.standardOutput.contains("\"available\":3"), "\(status.standardOutput)")
        let list = try queue("list")
        #expect(list.status == 0 && list.standardOutput.split(separator: "\n").count == 4)
        let shown = try queue("show", "--custom-id", "b", "--json")
        #expect(shown.status == 0 && shown.standardOutput.contains("\"custom_id\":\"b\""))
        #expect(try queue("cancel", "--custom-id", "a").status == 0)
        let retried = try queue("retry", "--state", "cancelled")
        #expect(retried.status == 0, "\(retried.standardError)")
        #expect(try queue("cancel", "--all").status == 0)
        let exported = try queue("export", "--output", "-")
        #expect(exported.status == 0 && exported.standardOutput.split(separator: "\n").count == 3)
        let pruned = try queue("prune", "--older-than", "1d")
        #expect(pruned.status == 0 && pruned.standardOutput.hasPrefix("deleted 0 finished jobs"), "\(pruned.standardOutput)")
    }

    @Test func badURLsExit64AndAnUnreachableServerExits75() throws {
        let workspace = try Workspace()
        defer { workspace.remove() }
        let bad = try workspace.run(["status", "--db", "postgres://:secret@host/db"])
        #expect(bad.status == 64)
        #expect(bad.errorLines == ["dllava: postgres://:***@host/db is not a usable queue location: it names no user (postgres://USER@host/database)"])
        // A port nothing listens on (the test server's port + 1 is as likely free as any).
        let port = try TestPostgres.shared().port + 1
        let away = try workspace.run(["status", "--db", "postgres://u:secret@127.0.0.1:\(port)/db", "--busy-timeout", "0.5"])
        #expect(away.status == 75, "\(away.standardError)")
        #expect(away.standardError.contains("cannot reach the queue database postgres://u:***@127.0.0.1:\(port)/db"), "\(away.standardError)")
        #expect(!away.standardError.contains("secret"))
        // A database without a queue: init creates one, other commands refuse with 78.
        let empty = try TestPostgres.shared().createDatabase()
        let refused = try workspace.run(["list", "--db", empty])
        #expect(refused.status == 78 && refused.standardError.contains("dllava init --db"), "\(refused.standardError)")
    }

    @Test func exportReadsResultsFromTheDatabaseAndNamesTheJobOfADamagedOne() throws {
        let workspace = try Workspace()
        defer { workspace.remove() }
        let url = try TestPostgres.shared().createDatabase()
        #expect(try workspace.run(["init", "--db", url]).status == 0)
        _ = try workspace.run(["enqueue", "--db", url, "--jsonl", try workspace.standardManifest().path])
        // Job a "succeeded" with stored bytes whose sha256 is not the one its row records (no file anywhere).
        try TestPostgres.shared().psql("""
            UPDATE dllava.job SET state = 'succeeded', attempt = 1, finalized_at = 1, output_sha256 = repeat('0', 64) WHERE custom_id = 'a';
            INSERT INTO dllava.result SELECT id, 1, repeat('0', 64), '\\x0102'::bytea, 1 FROM dllava.job WHERE custom_id = 'a'
            """, database: String(url.split(separator: "/").last!))
        let exported = try workspace.run(["export", "--db", url, "--output", "-"])
        #expect(exported.status == 65, "\(exported.standardError)")
        #expect(exported.errorLines.first?.hasPrefix("dllava: job 1: the stored result of attempt 1 in \(url) has sha256 ") == true, "\(exported.standardError)")
        #expect(exported.standardOutput.split(separator: "\n").count == 3)
    }

    @Test func reportReadsCaptionsFromTheDatabaseAsExportDoesAndExits65OnADamagedOne() throws {
        let workspace = try Workspace()
        defer { workspace.remove() }
        let url = try TestPostgres.shared().createDatabase()
        let database = String(url.split(separator: "/").last!)
        #expect(try workspace.run(["init", "--db", url]).status == 0)
        _ = try workspace.run(["enqueue", "--db", url, "--jsonl", try workspace.standardManifest().path])
        // Jobs a and b succeeded with results stored only in the database, as a worker without --out leaves them.
        for (customID, caption) in [("a", "A red circle."), ("b", "Two blue triangles.")] {
            let record = ResultRecord(queueID: "q", jobID: 0, attempt: 1, customID: customID, text: caption, tokenIDs: [1, 2, 3], finishReason: "stop",
                                      parameters: JobParameters(), stats: Stats(decode_ms: 1), model: ModelFingerprint(fingerprint: "f"),
                                      timings: ResultTimings(startedAt: 1, finishedAt: 2))
            let bytes = try ResultFile.encode(record)
            let sha256 = Checksum.sha256Hex(bytes)
            _ = try TestPostgres.shared().psql("""
                UPDATE dllava.job SET state = 'succeeded', attempt = 1, finalized_at = 1, output_sha256 = '\(sha256)' WHERE custom_id = '\(customID)';
                INSERT INTO dllava.result SELECT id, 1, '\(sha256)', '\\x\(bytes.map { String(format: "%02x", $0) }.joined())'::bytea, 1
                    FROM dllava.job WHERE custom_id = '\(customID)'
                """, database: database)
        }
        func shownJobs() throws -> (ProcessResult, [[String: Any]]) {
            let report = try workspace.run(["report", "--db", url, "--output", "report.html"])
            let page = try parseReportPage(workspace.directory.appendingPathComponent("report.html").path)
            let data = try #require(try JSONSerialization.jsonObject(with: Data(page.scripts[0].text.utf8)) as? [String: Any])
            return (report, try #require(data["jobs"] as? [[String: Any]]))
        }
        let (report, jobs) = try shownJobs()
        #expect(report.status == 0, "\(report.standardError)")
        #expect(jobs.map { $0["text"] as? String } == ["A red circle.", "Two blue triangles.", nil])
        #expect(jobs.prefix(2).allSatisfy { $0["tokens"] as? Int == 3 && $0["error"] == nil })

        // Job b's stored bytes no longer match the sha256 its row records: the page says so, and the exit status is 65.
        _ = try TestPostgres.shared().psql("UPDATE dllava.result SET record = '\\x0102'::bytea WHERE job_id = (SELECT id FROM dllava.job WHERE custom_id = 'b')",
                                           database: database)
        let (damaged, shown) = try shownJobs()
        #expect(damaged.status == 65, "\(damaged.standardError)")
        #expect(damaged.errorLines.first?.hasPrefix("dllava: job 2: the result cannot be read: the stored result of attempt 1 in \(url) has sha256 ") == true,
                "\(damaged.standardError)")
        #expect(shown[0]["text"] as? String == "A red circle." && shown[1]["text"] == nil && shown[1]["result_unreadable"] as? Bool == true)
    }

    @Test func runOnAnSQLiteQueueNeedsAnOutputFolder() throws {
        let workspace = try Workspace()
        defer { workspace.remove() }
        let refused = try workspace.run(["run", "--db", workspace.database, "--model", "none", "--until-empty"])
        #expect(refused.status == 64 && refused.standardError.contains("--out is required on an SQLite queue"), "\(refused.standardError)")
    }

    @Test func copyMovesAQueueToPostgresAndBackWithoutRunningAnything() throws {
        let workspace = try Workspace()
        defer { workspace.remove() }
        #expect(try workspace.queue("init").status == 0)
        _ = try workspace.queue("enqueue", "--jsonl", try workspace.standardManifest().path)
        #expect(try workspace.queue("cancel", "--custom-id", "b").status == 0)
        let before = try workspace.queue("list", "--json").standardOutput
        let identity = try SQLiteJobQueue(path: workspace.database).identity
        let url = try TestPostgres.shared().createDatabase()
        let there = try workspace.run(["copy", "--from", workspace.database, "--to", url])
        #expect(there.status == 0 && there.standardOutput == "copied 3 jobs of queue \(identity) from \(workspace.database) to \(url), with 0 results and 0 snapshots\n",
                "\(there.standardError)")
        #expect(try workspace.run(["list", "--db", url, "--json"]).standardOutput == before)
        let back = workspace.directory.appendingPathComponent("back.sqlite").path
        #expect(try workspace.run(["copy", "--from", url, "--to", back]).status == 0)
        #expect(try workspace.run(["list", "--db", back, "--json"]).standardOutput == before)
        #expect(try SQLiteJobQueue(path: back).identity == identity)
        // Never into a queue that holds jobs.
        let again = try workspace.run(["copy", "--from", workspace.database, "--to", url])
        #expect(again.status == 65 && again.standardError.contains("already holds 3 jobs"), "\(again.standardError)")
    }
}
