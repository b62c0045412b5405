import BatchDaemon
import CommandLineSupport
import Foundation
import Testing
@testable import JobQueue
@testable import PostgresQueue

@Suite("QueueCopy")
struct QueueCopyTests {
    /// A queue with jobs in every state, a pruned id above the rest, results, timings and a snapshot path.
    static func populate(_ fixture: Fixture) throws -> [Job] {
        let queue = fixture.queue
        var jobs = fixture.jobs(7)
        jobs[5].parameters = JobParameters(maxTokens: 9, stop: ["\n"])
        let ids = try queue.enqueue(jobs).inserted
        // The last job is pruned: its id must never come back, in the copy either.
        _ = try queue.cancel(ids: [ids[6]])
        fixture.clock.advance(10)
        #expect(try queue.prune(olderThan: 1).deleted == 1)
        let claimed = try queue.claim(owner: "w", limit: 5, leaseDuration: 60_000)
        _ = try queue.complete(job: claimed[0].id, attempt: 1, owner: "w",
                               output: JobOutput(path: "/out/q/\(claimed[0].id)-1.json.zst", sha256: "ab", timings: JobTimings(totalMs: 12)))
        try queue.fail(job: claimed[1].id, attempt: 1, owner: "w", error: "not a JPEG", permanent: true)
        try queue.fail(job: claimed[2].id, attempt: 1, owner: "w", error: "out of memory", permanent: false)
        _ = try queue.cancel(ids: [claimed[3].id, ids[5]])
        try queue.recordSnapshotPath(job: claimed[4].id, path: "/out/q/snapshots/job-\(claimed[4].id).kv.zst")
        return try queue.list(.all, limit: 100)
    }

    @Test(arguments: [(Backend.sqlite, Backend.postgres), (Backend.postgres, Backend.sqlite)])
    func aCopyHoldsEveryJobAsItIsAndTheQueuesIdentity(_ from: Backend, _ to: Backend) throws {
        let source = try Fixture(from), target = try Fixture(to)
        defer { source.remove(); target.remove() }
        let jobs = try Self.populate(source)
        let report = try QueueCopy.copy(from: source.queue, to: target.queue)
        #expect(report.jobs == jobs.count && report.identity == source.queue.identity)
        let copy = try target.reopen()
        #expect(copy.identity == source.queue.identity)
        #expect(try copy.list(.all, limit: 100) == jobs)
        #expect(try copy.counts() == source.queue.counts())
        // New ids continue above the original's, and the copy runs its jobs like the original.
        let next = try copy.enqueue(source.jobs(1, prefix: "after-copy")).inserted
        #expect(next[0] > jobs.map(\.id).max()! + 1)
        let running = try #require(jobs.first { $0.state == .running })
        #expect(try copy.complete(job: running.id, attempt: running.attempt, owner: "w", output: JobOutput(path: "p", sha256: "s")))
    }

    @Test(arguments: [(Backend.sqlite, Backend.postgres), (Backend.postgres, Backend.sqlite), (Backend.postgres, Backend.postgres)])
    func resultsAndSnapshotsMoveWhereTheCopyKeepsThem(_ from: Backend, _ to: Backend) throws {
        let source = try Fixture(from), target = try Fixture(to)
        defer { source.remove(); target.remove() }
        let sourceStore = try ArtifactStoreTests.store(of: source.queue, in: source.directory)
        let ids = try source.queue.enqueue(source.jobs(3)).inserted
        let claimed = try source.queue.claim(owner: "w", limit: 3, leaseDuration: 60_000)
        let record = ArtifactStoreTests.bytes(400, seed: 8), snapshot = ArtifactStoreTests.bytes(900, seed: 9)
        let stored = try sourceStore.putResult(record, job: ids[0], attempt: claimed[0].attempt)
        #expect(try source.queue.complete(job: ids[0], attempt: 1, owner: "w", output: JobOutput(path: stored.path, sha256: stored.sha256)))
        try sourceStore.putSnapshot(snapshot, job: ids[1])
        #expect(try source.queue.release(jobs: [ids[1]], owner: "w") == 1)
        // Job 3 succeeded with a result that is no longer where its row says (or was never stored): copied, reported.
        #expect(try source.queue.complete(job: ids[2], attempt: 1, owner: "w", output: JobOutput(path: "/gone/3-1.json.zst", sha256: stored.sha256)))
        let out = target.directory.appendingPathComponent("out")
        let report = try QueueCopy.copy(from: source.queue, to: target.queue) { identity in
            try DirectoryArtifactStore(queue: target.queue, out: out, identity: identity)
        }
        let copy = try target.reopen()
        let copyStore = try copy.storedArtifacts ?? DirectoryArtifactStore(queue: copy, out: out)
        #expect(report.jobs == 3 && report.results == 1 && report.snapshots == 1, "\(report)")
        #expect(try copyStore.result(of: try #require(try copy.job(id: ids[0]))) == record)
        #expect(try copyStore.snapshot(job: ids[1]) == snapshot)
        // Into SQLite, a job the source's database holds no result of keeps the file its row records.
        if to == .postgres {
            #expect(report.unreadableResults.count == 1 && report.unreadableResults[0].hasPrefix("job \(ids[2]): "), "\(report.unreadableResults)")
        } else {
            #expect(try report.unreadableResults.isEmpty && copy.job(id: ids[2])?.outputPath == "/gone/3-1.json.zst")
        }
    }

    @Test func aCopyOfStoredResultsIntoSQLiteWithoutAFolderIsRefused() throws {
        let source = try Fixture(.postgres), target = try Fixture(.sqlite)
        defer { source.remove(); target.remove() }
        let id = try source.queue.enqueue(source.jobs(1)).inserted[0]
        try #require(source.queue.storedArtifacts).putSnapshot(Data([1, 2, 3]), job: id)
        #expect(throws: QueueCopyError.needsOutputFolder(source: source.queue.location, target: target.queue.location)) {
            try QueueCopy.copy(from: source.queue, to: target.queue)
        }
    }

    @Test(arguments: Backend.allCases)
    func aCopyIntoAQueueThatHoldsJobsIsRefused(_ backend: Backend) throws {
        let source = try Fixture(.sqlite), target = try Fixture(backend)
        defer { source.remove(); target.remove() }
        try source.queue.enqueue(source.jobs(2))
        try target.queue.enqueue(target.jobs(1, prefix: "mine"))
        #expect(throws: QueueCopyError.targetNotEmpty(location: target.queue.location, jobs: 1)) {
            try QueueCopy.copy(from: source.queue, to: target.queue)
        }
        #expect(try target.queue.list(.all, limit: 10).map(\.customID) == ["mine-0"])
    }
}
