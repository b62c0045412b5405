import Foundation
import GRDB
import Testing
@testable import JobQueue

/// The queue contract: every test taking a `Backend` runs on SQLite and on PostgreSQL (a throwaway cluster,
/// `TestPostgres`); the others check what only one backend has (SQLite's file, pragmas and plans).
@Suite("JobQueue")
struct QueueTests {
    @Test func migrationsCreateTheStrictJobTableOnAFreshDatabase() throws {
        let fixture = try Fixture()
        defer { fixture.remove() }
        #expect(try fixture.queue.appliedMigrations() == ["v1-job", "v2-job-identity", "v3-worker-registry", "v4-job-progress", "v5-snapshot-secret"])
        let pool = try DatabasePool(path: fixture.databasePath)
        let strict = try pool.read { try Bool.fetchOne($0, sql: "SELECT strict FROM pragma_table_list WHERE name = 'job'") }
        #expect(strict == true)
        let journal = try pool.read { try String.fetchOne($0, sql: "PRAGMA journal_mode") }
        #expect(journal == "wal")
        // Opening again applies nothing new.
        let again = try SQLiteJobQueue(path: fixture.databasePath)
        #expect(try again.appliedMigrations() == ["v1-job", "v2-job-identity", "v3-worker-registry", "v4-job-progress", "v5-snapshot-secret"])
        #expect(again.identity == fixture.queue.identity)
    }

    @Test(arguments: Backend.allCases) func eachQueueHasItsOwnIdentityFromCreation(_ backend: Backend) throws {
        let first = try Fixture(backend), second = try Fixture(backend)
        defer { first.remove(); second.remove() }
        #expect(UUID(uuidString: first.queue.identity) != nil && first.queue.identity == first.queue.identity.lowercased())
        #expect(first.queue.identity != second.queue.identity)
    }

    @Test(arguments: Backend.allCases) func pruneNeverLetsANewJobTakeAPrunedJobsID(_ backend: Backend) throws {
        let fixture = try Fixture(backend)
        defer { fixture.remove() }
        let queue = fixture.queue
        let ids = try queue.enqueue(fixture.jobs(2)).inserted
        for job in try queue.claim(owner: "w", limit: 2, leaseDuration: 60_000) {
            _ = try queue.complete(job: job.id, attempt: job.attempt, owner: "w", output: JobOutput(path: "/out/\(job.id)", sha256: "s"))
        }
        fixture.clock.advance(10)
        #expect(try queue.prune(olderThan: 1).deleted == 2)
        let next = try queue.enqueue(fixture.jobs(1, prefix: "later")).inserted
        #expect(next == [ids[1] + 1])
    }

    @Test func aVersion1QueueGetsAnIdentityAndKeepsItsJobsAndIDs() throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("v1.sqlite").path
        // A queue as the v1 schema left it: jobs 1 to 3, of which 3 was pruned (SQLite would reuse 3 for the next job).
        let database = try DatabaseQueue(path: path)
        try Schema.migrator.migrate(database, upTo: "v1-job")
        try database.write { db in
            for id in 1...3 {
                try db.execute(sql: """
                    INSERT INTO job (id, custom_id, idempotency_key, image_path, image_sha256, prompt, params, max_attempts, run_at,
                                     created_at, updated_at)
                    VALUES (?, ?, ?, '/i.jpg', 'aa', 'Describe.', '{}', 3, 0, 0, 0)
                    """, arguments: [id, "old-\(id)", "custom_id:old-\(id)"])
            }
            try db.execute(sql: "DELETE FROM job WHERE id = 3")
        }
        try database.close()
        let queue = try SQLiteJobQueue(path: path)
        #expect(try queue.appliedMigrations() == ["v1-job", "v2-job-identity", "v3-worker-registry", "v4-job-progress", "v5-snapshot-secret"])
        #expect(UUID(uuidString: queue.identity) != nil)
        #expect(try queue.list().map(\.customID) == ["old-1", "old-2"])
        func jobs(_ count: Int, prefix: String) -> [NewJob] {
            (0..<count).map { NewJob(customID: "\(prefix)-\($0)", imagePath: "/i.jpg", imageSHA256: "aa", prompt: "Describe.") }
        }
        let next = try queue.enqueue(jobs(2, prefix: "new")).inserted
        #expect(next == [3, 4])
        // Pruned from now on, an id is never handed out again.
        #expect(try queue.cancel(ids: next).cancelled == 2)
        Thread.sleep(forTimeInterval: 0.01)
        #expect(try queue.prune(olderThan: 1).deleted == 2)
        #expect(try queue.enqueue(jobs(1, prefix: "last")).inserted == [5])
    }

    @Test func openingAMissingDatabaseWithoutCreateFails() throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("none.sqlite").path
        #expect(throws: JobQueueError.noDatabase(path: path)) { try SQLiteJobQueue(path: path) }
        #expect(!FileManager.default.fileExists(atPath: path))
    }

    @Test func aDatabaseFromANewerBuildIsRefused() throws {
        let fixture = try Fixture()
        defer { fixture.remove() }
        let pool = try DatabasePool(path: fixture.databasePath)
        try pool.write { try $0.execute(sql: "INSERT INTO grdb_migrations (identifier) VALUES ('v99-future')") }
        #expect(throws: JobQueueError.newerSchema(path: fixture.databasePath)) { try SQLiteJobQueue(path: fixture.databasePath) }
    }

    @Test func finalizedAtIsRequiredExactlyOnFinalStates() throws {
        let fixture = try Fixture()
        defer { fixture.remove() }
        let id = try fixture.queue.enqueue(fixture.jobs(1)).inserted[0]
        let pool = try DatabasePool(path: fixture.databasePath)
        #expect(throws: DatabaseError.self) {
            try pool.write { try $0.execute(sql: "UPDATE job SET state = 'failed' WHERE id = ?", arguments: [id]) }
        }
        #expect(throws: DatabaseError.self) {
            try pool.write { try $0.execute(sql: "UPDATE job SET finalized_at = 1 WHERE id = ?", arguments: [id]) }
        }
    }

    @Test(arguments: Backend.allCases) func enqueueIsIdempotentByCustomIDAndByContent(_ backend: Backend) throws {
        let fixture = try Fixture(backend)
        defer { fixture.remove() }
        let queue = fixture.queue
        let first = try queue.enqueue(fixture.jobs(5))
        #expect(first.inserted.count == 5 && first.alreadyPresent.isEmpty)
        let second = try queue.enqueue(fixture.jobs(5))
        #expect(second.inserted.isEmpty && second.alreadyPresent == first.inserted)

        // Same custom id, different content: a conflict, not a job already queued (and nothing is written).
        var changed = fixture.jobs(1)[0]
        changed.prompt = "Something else."
        let conflicting = try queue.enqueue([changed])
        #expect(conflicting.alreadyPresent.isEmpty && conflicting.inserted.isEmpty)
        #expect(conflicting.conflicts == [EnqueueResult.Conflict(index: 0, existingID: first.inserted[0])])
        #expect(try queue.job(id: first.inserted[0])?.prompt == "Describe the image.")

        // No custom id: image bytes + prompt + parameters decide, wherever the image lives.
        let a = NewJob(imagePath: "/a.jpg", imageSHA256: String(repeating: "b", count: 64), prompt: "What is it?",
                       parameters: JobParameters(maxTokens: 16))
        var moved = a
        moved.imagePath = "/elsewhere/a.jpg"
        var otherParameters = a
        otherParameters.parameters.maxTokens = 17
        let result = try queue.enqueue([a, moved, otherParameters])
        #expect(result.inserted.count == 2 && result.alreadyPresent == [result.inserted[0]])
        #expect(a.idempotencyKey.hasPrefix("sha256:") && a.idempotencyKey.count == 7 + 64)
        #expect(try queue.counts()[.available] == 7)
    }

    @Test(arguments: Backend.allCases) func invalidJobsAreRefusedBeforeAnythingIsWritten(_ backend: Backend) throws {
        let fixture = try Fixture(backend)
        defer { fixture.remove() }
        var bad = fixture.jobs(2)
        bad[1].parameters.topP = 0
        #expect(throws: JobQueueError.invalidJob(reason: "top_p must be in (0, 1]")) { try fixture.queue.enqueue(bad) }
        bad[1].parameters.topP = nil
        bad[1].prompt = ""
        #expect(throws: JobQueueError.self) { try fixture.queue.enqueue(bad) }
        #expect(try fixture.queue.counts()[.available] == 0)
    }

    @Test(arguments: Backend.allCases) func claimTakesLowestPriorityThenEarliestRunAtThenID(_ backend: Backend) throws {
        let fixture = try Fixture(backend)
        defer { fixture.remove() }
        let now = fixture.clock.now
        var jobs = fixture.jobs(6)
        jobs[0].priority = 5
        jobs[1].priority = 1; jobs[1].runAt = now - 10
        jobs[2].priority = 1; jobs[2].runAt = now - 20
        jobs[3].priority = 0
        jobs[4].priority = 0; jobs[4].runAt = now + 1_000  // not yet due
        jobs[5].priority = 1; jobs[5].runAt = now - 20
        let ids = try fixture.queue.enqueue(jobs).inserted
        let claimed = try fixture.queue.claim(owner: "w", limit: 10, leaseDuration: 60_000)
        #expect(claimed.map(\.id) == [ids[3], ids[2], ids[5], ids[1], ids[0]])
        #expect(claimed.allSatisfy { $0.state == .running && $0.attempt == 1 && $0.leaseOwner == "w" })
        #expect(claimed.allSatisfy { $0.leaseExpiresAt == now + 60_000 && $0.startedAt == now })
        fixture.clock.advance(1_000)
        #expect(try fixture.queue.claim(owner: "w", limit: 10, leaseDuration: 60_000).map(\.id) == [ids[4]])
        #expect(try fixture.queue.claim(owner: "w", limit: 10, leaseDuration: 60_000).isEmpty)
    }

    @Test(arguments: Backend.allCases) func claimTakesTheJobsAboutOneImageTogether(_ backend: Backend) throws {
        let fixture = try Fixture(backend)
        defer { fixture.remove() }
        var jobs = fixture.jobs(8)
        let images = ["a", "b", "c", "a", "b", "c", "a", "a"]
        for (i, image) in images.enumerated() { jobs[i].imageSHA256 = String(repeating: image, count: 64) }
        jobs[7].priority = 1  // never moves ahead of the jobs of a better priority
        let ids = try fixture.queue.enqueue(jobs).inserted
        let first = try fixture.queue.claim(owner: "w", limit: 4, leaseDuration: 60_000)
        #expect(first.map(\.id) == [ids[0], ids[1], ids[3], ids[6]], "image a's jobs of priority 0, then b's first")
        let second = try fixture.queue.claim(owner: "w", limit: 3, leaseDuration: 60_000)
        #expect(second.map(\.id) == [ids[2], ids[4], ids[5]])
        #expect(try fixture.queue.claim(owner: "w", limit: 3, leaseDuration: 60_000).map(\.id) == [ids[7]])
    }

    @Test func claimOrderLooksAheadABoundedStretch() {
        let candidates = (0..<10).map { ClaimOrder.Candidate(id: Int64($0), priority: 0, imageSHA256: $0 % 2 == 0 ? "x" : "y") }
        #expect(ClaimOrder.choose(candidates, limit: 4) == [0, 2, 4, 6])
        #expect(ClaimOrder.choose(candidates, limit: 20) == [0, 2, 4, 6, 8, 1, 3, 5, 7, 9])
        #expect(ClaimOrder.lookahead(8) >= 8)
    }

    @Test func claimAndRescueWalkTheirIndexesWithoutSorting() throws {
        let fixture = try Fixture()
        defer { fixture.remove() }
        try fixture.queue.enqueue(fixture.jobs(2_000))
        let pool = try DatabasePool(path: fixture.databasePath)
        for (sql, index) in [(SQLiteJobQueue.claimCandidatesSQL, "job_claim_order"), (SQLiteJobQueue.rescueSQL, "job_lease_expiry")] {
            let plan = try pool.read { db in
                try Row.fetchAll(db, sql: "EXPLAIN QUERY PLAN " + sql.replacingOccurrences(of: "RETURNING *", with: ""),
                                 arguments: sql.contains("?1") ? [0, 3] : [0, 1]).map { $0["detail"] as String }
            }
            #expect(plan.contains { $0.contains("USING INDEX \(index)") || $0.contains("USING COVERING INDEX \(index)") }, "\(plan)")
            #expect(!plan.contains { $0.contains("TEMP B-TREE") }, "\(plan)")
        }
    }

    @Test(arguments: Backend.allCases) func claimNeverHandsOneJobToTwoWorkers(_ backend: Backend) throws {
        let fixture = try Fixture(backend)
        defer { fixture.remove() }
        let total = 1_500
        let ids = try fixture.queue.enqueue(fixture.jobs(total)).inserted
        // Two queue objects on one queue (two pools on one file, two connections to one server) stand for two
        // processes; each runs several claim loops on its own threads.
        let pools = [fixture.queue, try fixture.reopen()]
        let claimed = Collector<Int64>()
        let errors = Collector<String>()
        let workers = 6
        DispatchQueue.concurrentPerform(iterations: workers) { worker in
            let queue = pools[worker % 2]
            let owner = "worker-\(worker)"
            do {
                while true {
                    let jobs = try queue.claim(owner: owner, limit: 1 + worker % 4, leaseDuration: 600_000)
                    if jobs.isEmpty { break }
                    claimed.append(contentsOf: jobs.map(\.id))
                    for job in jobs {
                        let accepted = try queue.complete(job: job.id, attempt: job.attempt, owner: owner,
                                                          output: JobOutput(path: "/out/\(job.id)", sha256: "x"))
                        if !accepted { errors.append("job \(job.id) completion refused") }
                    }
                }
            } catch {
                errors.append("\(owner): \(error)")
            }
        }
        #expect(errors.values.isEmpty, "\(errors.values.prefix(5))")
        #expect(claimed.values.count == total)
        #expect(Set(claimed.values) == Set(ids))
        #expect(try fixture.queue.counts()[.succeeded] == total)
    }

    @Test(arguments: Backend.allCases) func completionFromAStaleAttemptOrAnotherOwnerIsRejected(_ backend: Backend) throws {
        let fixture = try Fixture(backend)
        defer { fixture.remove() }
        let queue = fixture.queue
        try queue.enqueue(fixture.jobs(1))
        let first = try #require(queue.claim(owner: "a", limit: 1, leaseDuration: 1_000).first)
        #expect(try !queue.complete(job: first.id, attempt: first.attempt, owner: "b", output: JobOutput(path: "p", sha256: "s")))
        #expect(try !queue.complete(job: first.id, attempt: first.attempt + 1, owner: "a", output: JobOutput(path: "p", sha256: "s")))

        // The lease expires; worker b rescues and claims the job as attempt 2.
        fixture.clock.advance(1_001)
        let second = try #require(queue.claim(owner: "b", limit: 1, leaseDuration: 1_000).first)
        #expect(second.id == first.id && second.attempt == 2)
        // a's late result and late failure are discarded.
        #expect(try !queue.complete(job: first.id, attempt: 1, owner: "a", output: JobOutput(path: "late", sha256: "late")))
        #expect(try queue.fail(job: first.id, attempt: 1, owner: "a", error: "late", permanent: true) == nil)
        #expect(try queue.complete(job: second.id, attempt: 2, owner: "b", output: JobOutput(path: "p2", sha256: "s2",
                                                                                               timings: JobTimings(totalMs: 5))))
        let done = try #require(try queue.job(id: first.id))
        #expect(done.state == .succeeded && done.outputPath == "p2" && done.outputSHA256 == "s2")
        #expect(done.finalizedAt == fixture.clock.now && done.leaseOwner == nil && done.timings?.totalMs == 5)
        // Completing twice is refused too: the row is no longer running.
        #expect(try !queue.complete(job: second.id, attempt: 2, owner: "b", output: JobOutput(path: "p3", sha256: "s3")))
        // The same completion again (a retry after a lost reply) is accepted and changes nothing.
        fixture.clock.advance(5)
        #expect(try queue.complete(job: second.id, attempt: 2, owner: "b", output: JobOutput(path: "p2", sha256: "s2")))
        #expect(try queue.job(id: first.id) == done)
    }

    @Test(arguments: Backend.allCases) func expiredLeasesAreRescued(_ backend: Backend) throws {
        let fixture = try Fixture(backend)
        defer { fixture.remove() }
        let queue = fixture.queue
        let ids = try queue.enqueue(fixture.jobs(3, maxAttempts: 2)).inserted
        _ = try queue.claim(owner: "dead", limit: 3, leaseDuration: 1_000)
        _ = try queue.cancel(ids: [ids[2]])
        fixture.clock.advance(999)
        #expect(try queue.rescueExpiredLeases() == 0)
        fixture.clock.advance(1)
        #expect(try queue.rescueExpiredLeases() == 3)
        let rescued = try #require(try queue.job(id: ids[0]))
        #expect(rescued.state == .retryable && rescued.leaseOwner == nil && rescued.leaseExpiresAt == nil)
        #expect(rescued.runAt == fixture.clock.now && rescued.finalizedAt == nil)
        #expect(rescued.error == "the lease of dead expired during attempt 1 of 2")
        #expect(try queue.job(id: ids[2])?.state == .cancelled)

        // The second attempt was the last: expiring it fails the job.
        let again = try queue.claim(owner: "dead-too", limit: 3, leaseDuration: 1_000)
        #expect(again.map(\.attempt) == [2, 2])
        fixture.clock.advance(5_000)
        #expect(try queue.claim(owner: "live", limit: 3, leaseDuration: 1_000).isEmpty)
        let failed = try #require(try queue.job(id: ids[0]))
        #expect(failed.state == .failed && failed.finalizedAt == fixture.clock.now)
        #expect(failed.error == "the lease of dead-too expired during attempt 2 of 2")
    }

    @Test(arguments: Backend.allCases) func heartbeatExtendsOnlyLeasesTheOwnerStillHolds(_ backend: Backend) throws {
        let fixture = try Fixture(backend)
        defer { fixture.remove() }
        let queue = fixture.queue
        let ids = try queue.enqueue(fixture.jobs(3)).inserted
        let mine = try queue.claim(owner: "a", limit: 2, leaseDuration: 1_000).map(\.id)
        _ = try queue.claim(owner: "b", limit: 1, leaseDuration: 1_000)
        _ = try queue.cancel(ids: [mine[1]])
        fixture.clock.advance(900)
        let beat = try queue.heartbeat(jobs: ids, owner: "a", leaseDuration: 1_000)
        #expect(beat.extended == Set(mine) && beat.lost == [ids[2]] && beat.cancelRequested == [mine[1]])
        #expect(try queue.job(id: mine[0])?.leaseExpiresAt == fixture.clock.now + 1_000)
        #expect(try queue.job(id: mine[0])?.heartbeatAt == fixture.clock.now)
        #expect(try queue.cancelRequested(among: ids) == [mine[1]])
        fixture.clock.advance(200)
        // b's lease expired, a's did not.
        #expect(try queue.rescueExpiredLeases() == 1)
        #expect(try queue.job(id: mine[0])?.state == .running)
    }

    @Test(arguments: Backend.allCases) func deadWorkersOfThisHostAreReclaimedAndSilentOnesReported(_ backend: Backend) throws {
        let fixture = try Fixture(backend)
        defer { fixture.remove() }
        let queue = fixture.queue
        let ids = try queue.enqueue(fixture.jobs(3)).inserted
        let now = fixture.clock.now
        var dead = WorkerRecord.current(owner: "dead", leaseMilliseconds: 60_000, now: now)
        dead.pid = Int32.max  // above any pid_max: no such process on this host
        let silent = WorkerRecord(owner: "silent", host: "elsewhere", bootID: "b", pid: 1, processStart: "1", leaseMilliseconds: 60_000,
                                  startedAt: now, heartbeatAt: now)
        for worker in [dead, silent, WorkerRecord.current(owner: "me", leaseMilliseconds: 60_000, now: now)] {
            try queue.register(worker)
            _ = try queue.claim(owner: worker.owner, limit: 1, leaseDuration: 60_000)
        }
        fixture.clock.advance(40_000)
        let orphans = try queue.orphanedJobs()
        #expect(orphans.map(\.id) == [ids[0], ids[1]] && orphans.map(\.owner) == ["dead", "silent"])
        #expect(orphans[1].liveness == .silent(since: now) && orphans[1].host == "elsewhere" && orphans[1].leaseExpiresAt == now + 60_000)
        #expect(try queue.reclaimJobsOfDeadWorkers() == 1)
        let reclaimed = try #require(try queue.job(id: ids[0]))
        #expect(reclaimed.state == .retryable && reclaimed.leaseOwner == nil && reclaimed.runAt == fixture.clock.now)
        #expect(reclaimed.error == "the worker dead died during attempt 1 of 3 (process \(Int32.max) is not running)")
        #expect(try queue.workers().map(\.owner) == ["me", "silent"])
        try queue.unregister(owner: "me")
        #expect(try queue.workers().map(\.owner) == ["silent"])
    }

    @Test(arguments: Backend.allCases) func aWorkersDeathChargesAnAttemptOnlyToAJobThatMadeNoProgress(_ backend: Backend) throws {
        let fixture = try Fixture(backend)
        defer { fixture.remove() }
        let queue = fixture.queue
        let ids = try queue.enqueue(fixture.jobs(4)).inserted
        let (steady, stalled, stuck, saving) = (ids[0], ids[1], ids[2], ids[3])
        // Seven workers die in turn holding all four: `steady` gets further under each, `stalled` only under the first,
        // `stuck` never; `saving` never gets further than under the first, but its stored snapshot advances each time
        // (each attempt resumes from it).
        for death in 1...7 {
            let claimed = try queue.claim(owner: "w\(death)", limit: 4, leaseDuration: 1_000).map(\.id)
            var progress: [Int64: JobProgress] = [steady: JobProgress(reached: Int64(10 * death), saved: 0),
                                                  saving: JobProgress(reached: death == 1 ? 100 : Int64(10 + 10 * death), saved: Int64(10 * death))]
            // A lower figure never lowers what was recorded.
            progress[stalled] = death == 1 ? JobProgress(reached: 5, saved: 0) : JobProgress(reached: 1, saved: 0)
            _ = try queue.heartbeat(jobs: claimed, owner: "w\(death)", leaseDuration: 1_000, progress: progress)
            fixture.clock.advance(1_000)
            #expect(try queue.rescueExpiredLeases() == claimed.count)
            let job = try #require(try queue.job(id: steady))
            #expect(job.state == .retryable && job.attempt == death && job.maxAttempts == 3 + death, "death \(death): \(job)")
            #expect(job.progress == Int64(10 * death) && job.deathsWithoutProgress == 0)
            #expect(job.error == "the lease of w\(death) expired during attempt \(death) after progress (reached \(10 * death - 10) to \(10 * death), "
                + "saved 0 to 0): not counted against its attempts")
            let saved = try #require(try queue.job(id: saving))
            #expect(saved.state == .retryable && saved.maxAttempts == 3 + death && saved.progress == 100 && saved.savedProgress == Int64(10 * death),
                    "death \(death): \(saved)")
            if death == 3 {
                let failed = try #require(try queue.job(id: stuck))
                #expect(failed.state == .failed && failed.finalizedAt == fixture.clock.now && failed.deathsWithoutProgress == 3)
                #expect(failed.error == "suspected of crashing the worker: present at 3 worker deaths in a row without progress "
                    + "(the lease of w3 expired during attempt 3)")
            }
        }
        let stalledJob = try #require(try queue.job(id: stalled))
        // Not charged for the first death; charged for the next three, the third of which failed it.
        #expect(stalledJob.state == .failed && stalledJob.attempt == 4 && stalledJob.maxAttempts == 4 && stalledJob.progress == 5)
        #expect(stalledJob.error == "suspected of crashing the worker: present at 3 worker deaths in a row without progress "
            + "(the lease of w4 expired during attempt 4)")
        // A retry gives fresh tries and forgets the deaths; the steady job's attempt still grows as its fencing token.
        #expect(try queue.retry(ids: [stalled], attempts: 1) == 1)
        #expect(try queue.job(id: stalled)?.deathsWithoutProgress == 0)
        let last = try queue.claim(owner: "live", limit: 4, leaseDuration: 1_000)
        #expect(last.map(\.id).sorted() == [steady, stalled, saving] && last.map(\.attempt).sorted() == [5, 8, 8])
    }

    @Test(arguments: Backend.allCases) func deadWorkersJobsFollowTheSameRuleWithTheConfiguredDeathLimit(_ backend: Backend) throws {
        let fixture = try Fixture(backend, retryPolicy: RetryPolicy(baseMs: 1_000, capMs: 60_000, deathLimit: 2, jitter: { 0.5 }))
        defer { fixture.remove() }
        let queue = fixture.queue
        let ids = try queue.enqueue(fixture.jobs(2, maxAttempts: 5)).inserted
        for death in 1...2 {
            var dead = WorkerRecord.current(owner: "dead\(death)", leaseMilliseconds: 60_000, now: fixture.clock.now)
            dead.pid = Int32.max  // above any pid_max: no such process on this host
            try queue.register(dead)
            let claimed = try queue.claim(owner: dead.owner, limit: 2, leaseDuration: 60_000).map(\.id)
            _ = try queue.heartbeat(jobs: claimed, owner: dead.owner, leaseDuration: 60_000, progress: [ids[0]: JobProgress(reached: Int64(death), saved: 0)])
            #expect(try queue.reclaimJobsOfDeadWorkers() == 2)
        }
        let progressed = try #require(try queue.job(id: ids[0]))
        #expect(progressed.state == .retryable && progressed.maxAttempts == 7)
        #expect(progressed.error == "the worker dead2 died during attempt 2 after progress (reached 1 to 2, saved 0 to 0): not counted against its attempts "
            + "(process \(Int32.max) is not running)")
        let suspect = try #require(try queue.job(id: ids[1]))
        #expect(suspect.state == .failed && suspect.maxAttempts == 5)
        #expect(suspect.error == "suspected of crashing the worker: present at 2 worker deaths in a row without progress "
            + "(the worker dead2 died during attempt 2) (process \(Int32.max) is not running)")
    }

    @Test func backoffGrowsExponentiallyAndIsCapped() {
        let half = RetryPolicy(baseMs: 1_000, capMs: 10_000, jitter: { 0.5 })
        #expect((1...7).map(half.delay(afterAttempt:)) == [750, 1_500, 3_000, 6_000, 7_500, 7_500, 7_500])
        let none = RetryPolicy(baseMs: 1_000, capMs: 10_000, jitter: { 0 })
        let most = RetryPolicy(baseMs: 1_000, capMs: 10_000, jitter: { 0.999_999 })
        for attempt in 1...70 {
            let exponential = attempt <= 5 ? Int64(1_000) << (attempt - 1) : 10_000
            let cap = min(exponential, 10_000)
            #expect(none.delay(afterAttempt: attempt) == cap / 2)
            #expect(most.delay(afterAttempt: attempt) == cap - 1 || most.delay(afterAttempt: attempt) == cap)
        }
    }

    @Test(arguments: Backend.allCases) func transientFailuresRetryAfterBackoffUntilAttemptsRunOut(_ backend: Backend) throws {
        let fixture = try Fixture(backend)
        defer { fixture.remove() }
        let queue = fixture.queue
        let id = try queue.enqueue(fixture.jobs(1, maxAttempts: 2)).inserted[0]
        let job = try #require(queue.claim(owner: "w", limit: 1, leaseDuration: 60_000).first)
        #expect(try queue.fail(job: id, attempt: job.attempt, owner: "w", error: "out of memory", permanent: false) == .retryable)
        let waiting = try #require(try queue.job(id: id))
        #expect(waiting.runAt == fixture.clock.now + 750 && waiting.error == "out of memory" && waiting.finalizedAt == nil)
        #expect(try queue.claim(owner: "w", limit: 1, leaseDuration: 60_000).isEmpty)
        fixture.clock.advance(750)
        let retry = try #require(queue.claim(owner: "w", limit: 1, leaseDuration: 60_000).first)
        #expect(retry.attempt == 2)
        #expect(try queue.fail(job: id, attempt: 2, owner: "w", error: "out of memory again", permanent: false) == .failed)
        let failed = try #require(try queue.job(id: id))
        #expect(failed.state == .failed && failed.finalizedAt == fixture.clock.now && failed.error == "out of memory again")
    }

    @Test(arguments: Backend.allCases) func permanentFailureGoesToFailedAtOnce(_ backend: Backend) throws {
        let fixture = try Fixture(backend)
        defer { fixture.remove() }
        let queue = fixture.queue
        let id = try queue.enqueue(fixture.jobs(1, maxAttempts: 5)).inserted[0]
        let job = try #require(queue.claim(owner: "w", limit: 1, leaseDuration: 60_000).first)
        #expect(try queue.fail(job: id, attempt: job.attempt, owner: "w", error: "image.jpg is not a JPEG", permanent: true) == .failed)
        let failed = try #require(try queue.job(id: id))
        #expect(failed.state == .failed && failed.attempt == 1 && failed.error == "image.jpg is not a JPEG")
        #expect(failed.finalizedAt != nil && failed.leaseOwner == nil)
    }

    @Test(arguments: Backend.allCases) func cancelFinalisesQueuedRowsAndFlagsRunningOnes(_ backend: Backend) throws {
        let fixture = try Fixture(backend)
        defer { fixture.remove() }
        let queue = fixture.queue
        let ids = try queue.enqueue(fixture.jobs(4)).inserted
        let running = try queue.claim(owner: "w", limit: 2, leaseDuration: 60_000)
        let result = try queue.cancel(.all)
        #expect(result == CancelResult(cancelled: 2, requested: 2))
        #expect(try queue.job(id: ids[2])?.state == .cancelled && queue.job(id: ids[2])?.finalizedAt != nil)
        let flagged = try #require(try queue.job(id: ids[0]))
        #expect(flagged.state == .running && flagged.cancelRequested)
        // Cancelling again changes nothing.
        #expect(try queue.cancel(.all) == CancelResult())
        // The worker sees the flag and finalises; a failure of a cancelled job also ends cancelled.
        #expect(try queue.acknowledgeCancel(job: running[0].id, attempt: running[0].attempt, owner: "w"))
        #expect(try queue.fail(job: running[1].id, attempt: running[1].attempt, owner: "w", error: "stopped", permanent: false) == .cancelled)
        #expect(try queue.counts()[.cancelled] == 4)
        #expect(try !queue.acknowledgeCancel(job: running[0].id, attempt: running[0].attempt, owner: "w"))
    }

    @Test(arguments: Backend.allCases) func retryAndCancelSelectByFilter(_ backend: Backend) throws {
        let fixture = try Fixture(backend)
        defer { fixture.remove() }
        let queue = fixture.queue
        let ids = try queue.enqueue(fixture.jobs(6)).inserted
        let claimed = try queue.claim(owner: "w", limit: 3, leaseDuration: 60_000)
        for job in claimed { try queue.fail(job: job.id, attempt: job.attempt, owner: "w", error: "bad image", permanent: true) }
        #expect(try queue.cancel(JobFilter(customIDs: ["job-3"])) == CancelResult(cancelled: 1, requested: 0))
        #expect(try queue.list(JobFilter(states: [.failed, .cancelled])).map(\.id) == Array(ids[0...3]))

        // Retry only the failed ones: they get three fresh tries; attempt keeps counting.
        #expect(try queue.retry(JobFilter(states: [.failed]), attempts: 3) == 3)
        let retried = try #require(try queue.job(id: ids[0]))
        #expect(retried.state == .available && retried.attempt == 1 && retried.maxAttempts == 4)
        #expect(retried.error == nil && retried.finalizedAt == nil)
        #expect(try queue.job(id: ids[3])?.state == .cancelled)
        // Retrying available or succeeded jobs does nothing; cancelled ones come back by id.
        #expect(try queue.retry(ids: [ids[0], ids[4]]) == 0)
        #expect(try queue.retry(ids: [ids[3]]) == 1)
        // Cancel by state leaves the other states alone.
        #expect(try queue.cancel(JobFilter(states: [.retryable])) == CancelResult())
        #expect(try queue.counts()[.available] == 6)
    }

    @Test(arguments: Backend.allCases) func bulkOperationsWorkInChunks(_ backend: Backend) throws {
        let fixture = try Fixture(backend)
        defer { fixture.remove() }
        let queue = fixture.queue
        try queue.enqueue(fixture.jobs(jobQueueChunkSize * 2 + 7))
        #expect(try queue.cancel(.all).cancelled == jobQueueChunkSize * 2 + 7)
        #expect(try queue.retry(.all) == jobQueueChunkSize * 2 + 7)
    }

    @Test(arguments: Backend.allCases) func pruneDeletesOnlyFinalRowsOlderThanTheCutoff(_ backend: Backend) throws {
        let fixture = try Fixture(backend)
        defer { fixture.remove() }
        let queue = fixture.queue
        let ids = try queue.enqueue(fixture.jobs(4)).inserted
        let claimed = try queue.claim(owner: "w", limit: 2, leaseDuration: 10_000_000)
        _ = try queue.complete(job: claimed[0].id, attempt: 1, owner: "w", output: JobOutput(path: "/out/1.json.zst", sha256: "s"))
        _ = try queue.cancel(ids: [ids[2]])
        fixture.clock.advance(7 * 86_400_000)
        _ = try queue.cancel(ids: [ids[3]])
        let pruned = try queue.prune(olderThan: 86_400_000)
        #expect(pruned.deleted == 2 && pruned.outputPaths == ["/out/1.json.zst"])
        #expect(try queue.list().map(\.id) == [ids[1], ids[3]])
    }

    @Test(arguments: Backend.allCases) func pruneReturnsTheSnapshotPathsItsRowsRecorded(_ backend: Backend) throws {
        let fixture = try Fixture(backend)
        defer { fixture.remove() }
        let queue = fixture.queue
        let ids = try queue.enqueue(fixture.jobs(2)).inserted
        try queue.recordSnapshotPath(job: ids[0], path: "/out/q/snapshots/job-\(ids[0]).kv.zst")
        #expect(try queue.job(id: ids[0])?.snapshotPath == "/out/q/snapshots/job-\(ids[0]).kv.zst")
        _ = try queue.cancel(ids: ids)
        fixture.clock.advance(10)
        let pruned = try queue.prune(olderThan: 1)
        #expect(pruned.deleted == 2 && pruned.snapshotPaths == ["/out/q/snapshots/job-\(ids[0]).kv.zst"] && pruned.outputPaths.isEmpty)
    }

    @Test(arguments: Backend.allCases) func releaseHandsJobsBackWithoutUsingATry(_ backend: Backend) throws {
        let fixture = try Fixture(backend)
        defer { fixture.remove() }
        let queue = fixture.queue
        let ids = try queue.enqueue(fixture.jobs(2, maxAttempts: 1)).inserted
        _ = try queue.claim(owner: "w", limit: 2, leaseDuration: 60_000)
        _ = try queue.cancel(ids: [ids[1]])
        #expect(try queue.release(jobs: ids, owner: "other") == 0)
        #expect(try queue.release(jobs: ids, owner: "w") == 2)
        let released = try #require(try queue.job(id: ids[0]))
        #expect(released.state == .available && released.attempt == 1 && released.maxAttempts == 2)
        #expect(try queue.job(id: ids[1])?.state == .cancelled)
        let again = try #require(queue.claim(owner: "w2", limit: 1, leaseDuration: 60_000).first)
        #expect(again.attempt == 2)
    }

    @Test(arguments: Backend.allCases) func statisticsGiveThroughputOverTheActivePartOfTheWindowAndAnETA(_ backend: Backend) throws {
        let fixture = try Fixture(backend)
        defer { fixture.remove() }
        let queue = fixture.queue
        try queue.enqueue(fixture.jobs(10))
        #expect(try queue.statistics().jobsPerHour == nil && queue.statistics().etaMs == nil)
        // Four jobs done in the first 10 minutes of work.
        for _ in 0..<4 {
            let job = try #require(queue.claim(owner: "w", limit: 1, leaseDuration: 60_000).first)
            fixture.clock.advance(150_000)
            _ = try queue.complete(job: job.id, attempt: job.attempt, owner: "w", output: JobOutput(path: "p", sha256: "s"))
        }
        let statistics = try queue.statistics(window: 3_600_000)
        #expect(statistics.succeededInWindow == 4 && statistics.remaining == 6)
        #expect(statistics.jobsPerHour == 24)
        #expect(statistics.etaMs == 900_000)
    }

    @Test func parametersHaveOneCanonicalJSON() throws {
        let parameters = JobParameters(maxTokens: 32, temperature: 0.5, topP: 0.9, topK: 40, seed: 7, stop: ["\n"],
                                       sparsity: .dynamic, visionKeepRate: 0.25)
        #expect(parameters.canonicalJSON() == #"{"max_tokens":32,"seed":7,"sparsity":"dynamic","stop":["\n"],"temperature":0.5,"top_k":40,"top_p":0.9,"vision_keep_rate":0.25}"#)
        #expect(JobParameters().canonicalJSON() == "{}")
        #expect(try JobParameters.decode(canonicalJSON: parameters.canonicalJSON()) == parameters)
    }

    @Test func durationsParse() {
        #expect(DurationText.milliseconds("7d") == 604_800_000)
        #expect(DurationText.milliseconds("12h") == 43_200_000)
        #expect(DurationText.milliseconds("30m") == 1_800_000)
        #expect(DurationText.milliseconds("45s") == 45_000)
        #expect(DurationText.milliseconds("1h30m") == 5_400_000)
        #expect(DurationText.milliseconds("250ms") == 250)
        for bad in ["", "7", "d", "-1h", "1x", "1h 30m", "99999999999999999999d"] {
            #expect(DurationText.milliseconds(bad) == nil, "\(bad)")
        }
    }
}
