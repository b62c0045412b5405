// Stale work after a crash: workers register themselves, a dead worker's jobs
// are reclaimed at once by a worker on its host, `status` and `list` name orphaned jobs and when
// they are reclaimed, and `run --until-empty` waits for reclaimable work instead of leaving it.
import CommandLineSupport
import Foundation
import GRDB
import Testing

@Suite("dllava run: work of dead and silent workers", .serialized)
struct StaleWorkTests {
    @Test("after kill -9, status and list name the orphaned job; a run on the same host reclaims it at once and resumes it, long before the lease expires")
    func aDeadWorkersJobIsReclaimedAtOnce() throws {
        let lines: [[String: Any]] = [["custom_id": "long", "image": sample("test_000001.png"), "prompt": "Describe.", "max_tokens": 1500],
                                      ["custom_id": "short", "image": sample("test_000002.png"), "prompt": "Describe.", "max_tokens": 6]]
        let directory = try workspace(manifest: lines)
        defer { try? FileManager.default.removeItem(at: directory) }
        let killed = try startRun(["--batch-size", "1", "--snapshot-every", "10", "--lease", "5m"], in: directory)
        waitFor(snapshotFile(directory, job: 1))
        kill(killed.processIdentifier, SIGKILL)
        killed.waitUntilExit()

        let status = try run(["status", "--db", "q.sqlite"], in: directory)
        #expect(status.status == 0, "\(status.standardError)")
        #expect(status.standardOutput.contains("orphaned   1 running job whose worker is gone:\n  job 1: worker "), "\(status.standardOutput)")
        #expect(status.standardOutput.contains("is gone (process \(killed.processIdentifier) is not running); the next `dllava run` on "
                                               + "\(ProcessInfo.processInfo.hostName) reclaims it at once"), "\(status.standardOutput)")
        let json = try run(["status", "--db", "q.sqlite", "--json"], in: directory)
        let object = try JSONSerialization.jsonObject(with: Data(json.standardOutput.utf8)) as! [String: Any]
        let orphaned = object["orphaned"] as? [[String: Any]] ?? []
        #expect(orphaned.count == 1 && orphaned.first?["id"] as? Int == 1)
        let list = try run(["list", "--db", "q.sqlite", "--state", "running"], in: directory)
        #expect(list.standardOutput.contains("is gone (process \(killed.processIdentifier) is not running)"), "\(list.standardOutput)")

        let started = Date()
        let restart = try startRun(["--lease", "5m"], in: directory)
        restart.waitUntilExit()
        #expect(restart.terminationStatus == 0)
        #expect(Date().timeIntervalSince(started) < 150, "the job waited for its 5 minute lease")
        let log = try String(contentsOf: directory.appendingPathComponent("run.log"), encoding: .utf8)
        #expect(log.contains("reclaimed 1 job of dead workers on this host"), "\(log)")
        #expect(log.contains("resuming from \(snapshotFile(directory, job: 1).path)"), "\(log)")
        let records = try export(directory)
        #expect(records["long"]?["state"] as? String == "succeeded" && records["short"]?["state"] as? String == "succeeded")
    }

    @Test("run --until-empty waits for the job of a silent worker on another host until its lease expires, then runs it")
    func untilEmptyWaitsForASilentWorkersJob() throws {
        let directory = try workspace(manifest: [["custom_id": "stuck", "image": sample("test_000003.png"), "prompt": "Describe.", "max_tokens": 6]])
        defer { try? FileManager.default.removeItem(at: directory) }
        let database = try DatabaseQueue(path: directory.appendingPathComponent("q.sqlite").path)
        let now = Int64(Date().timeIntervalSince1970 * 1000)
        try database.write { db in
            try db.execute(sql: """
                INSERT INTO worker (owner, host, boot_id, pid, process_start, lease_ms, started_at, heartbeat_at)
                VALUES ('far-away-1', 'another-host', 'boot', 1, '1', 2000, ?, ?)
                """, arguments: [now - 60_000, now - 10_000])
            try db.execute(sql: """
                UPDATE job SET state = 'running', attempt = 1, lease_owner = 'far-away-1', lease_expires_at = ?, heartbeat_at = ?, started_at = ?
                WHERE id = 1
                """, arguments: [now + 3_000, now - 10_000, now - 60_000])
        }
        try database.close()
        let status = try run(["status", "--db", "q.sqlite"], in: directory)
        #expect(status.standardOutput.contains("job 1: worker far-away-1 on another-host is silent (no heartbeat since "), "\(status.standardOutput)")
        let daemon = try startRun([], in: directory)
        daemon.waitUntilExit()
        #expect(daemon.terminationStatus == 0)
        let log = try String(contentsOf: directory.appendingPathComponent("run.log"), encoding: .utf8)
        #expect(log.contains("waiting for 1 job of silent workers (far-away-1)"), "\(log)")
        #expect(try export(directory)["stuck"]?["state"] as? String == "succeeded")
    }
}
