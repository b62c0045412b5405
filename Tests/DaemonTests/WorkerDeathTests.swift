// A worker killed again and again (SIGKILL) while its jobs make progress: the deaths cost those jobs no attempts, so
// more kills than `--max-attempts` fail none of them, and each resumes from its snapshot to the uninterrupted output.
import CommandLineSupport
import Foundation
import GRDB
import Testing

@Suite("dllava run: a killed worker's jobs that progressed lose no attempt", .serialized)
struct WorkerDeathTests {
    @Test("a worker killed four times (more than --max-attempts 3) while every job it holds has progressed since its claim: no job fails, each succeeds with the uninterrupted output")
    func killsOfAWorkerWhoseJobsProgressCostNoAttempts() throws {
        // Sixteen long jobs in one batch: a decode step of sixteen is slow enough that each worker is killed long
        // before its jobs end.
        let count = 16
        let manifest: [[String: Any]] = (0..<count).map { i in
            ["custom_id": "job\(i)", "image": sample("test_00000\(i % 4).png"), "prompt": "Describe picture \(i).", "max_tokens": 1400]
        }
        let reference = try workspace(manifest: manifest)
        defer { try? FileManager.default.removeItem(at: reference) }
        let uninterrupted = try startRun(["--batch-size", "16", "--threads", "1"], in: reference)
        uninterrupted.waitUntilExit()
        let expected = try outputs(reference)

        let directory = try workspace(manifest: manifest)
        defer { try? FileManager.default.removeItem(at: directory) }
        let database = try DatabaseQueue(path: directory.appendingPathComponent("q.sqlite").path)
        // Whether the worker with this pid holds running jobs and every one of them has progressed since this attempt
        // claimed it, as its heartbeats recorded (further than ever before, or a newer stored snapshot frame).
        func holdsOnlyProgressedJobs(_ pid: Int32) throws -> Bool {
            try database.read { db in
                let row = try Row.fetchOne(db, sql: """
                    SELECT count(*) AS held,
                           count(*) FILTER (WHERE progress <= progress_at_claim AND saved_progress <= saved_progress_at_claim) AS stalled
                    FROM job WHERE state = 'running' AND lease_owner IN (SELECT owner FROM worker WHERE pid = ?)
                    """, arguments: [pid])!
                return (row["held"] as Int) > 0 && (row["stalled"] as Int) == 0
            }
        }
        var kills = 0
        for _ in 0..<4 {
            let worker = try startRun(["--batch-size", "16", "--threads", "1", "--lease", "2s", "--snapshot-every", "4"], in: directory)
            // The worker is stopped (SIGSTOP) once the condition holds and it is checked again while the worker cannot
            // move, so it still holds when the worker is killed.
            let deadline = Date().addingTimeInterval(120)
            var ready = false
            while !ready && worker.isRunning && Date() < deadline {
                if try holdsOnlyProgressedJobs(worker.processIdentifier) {
                    kill(worker.processIdentifier, SIGSTOP)
                    ready = try holdsOnlyProgressedJobs(worker.processIdentifier)
                    if !ready { kill(worker.processIdentifier, SIGCONT) }
                }
                if !ready { Thread.sleep(forTimeInterval: 0.05) }
            }
            kill(worker.processIdentifier, SIGKILL)
            worker.waitUntilExit()
            if ready { kills += 1 }
        }
        let log = (try? String(contentsOf: directory.appendingPathComponent("run.log"), encoding: .utf8)) ?? ""
        #expect(kills == 4, "the worker was killed \(kills) times while its jobs had progressed: \(log)")

        // The next worker reclaims the dead one's jobs at once (same host) and finishes them.
        let last = try startRun(["--batch-size", "16", "--threads", "1"], in: directory)
        last.waitUntilExit()
        #expect(last.terminationStatus == 0)
        let records = try export(directory)
        let finalLog = (try? String(contentsOf: directory.appendingPathComponent("run.log"), encoding: .utf8)) ?? ""
        for i in 0..<count {
            let record = records["job\(i)"] ?? [:]
            #expect(record["state"] as? String == "succeeded", "job\(i): \(record)\n\(finalLog)")
            #expect(record["text"] as? String == expected["job\(i)"]?.1, "job\(i)")
        }
        // More claims than --max-attempts allows: the deaths were not counted.
        let attempts = records.values.compactMap { $0["attempts"] as? Int }
        #expect(attempts.contains { $0 > 3 }, "attempts: \(attempts)")
    }
}
