import Artifacts
import BatchDaemon
import CommandLineSupport
import Foundation
import Testing
@testable import JobQueue
@testable import PostgresQueue

/// The artifact store contract on both backends: PostgreSQL's database tables, and the SQLite queue's files under
/// `--out` (`DirectoryArtifactStore`).
@Suite("ArtifactStore")
struct ArtifactStoreTests {
    /// The store a worker of `queue` uses: the queue's database, or files under `folder/out`.
    static func store(of queue: JobQueue, in folder: URL) throws -> ArtifactStore {
        try queue.storedArtifacts ?? DirectoryArtifactStore(queue: queue, out: folder.appendingPathComponent("out"))
    }

    static func bytes(_ count: Int, seed: UInt8) -> Data {
        Data((0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ Int(seed)) })
    }

    static func sha256(_ data: Data) -> String { Checksum.sha256Hex(data) }

    @Test(arguments: Backend.allCases)
    func theResultOfTheAcceptedAttemptIsReadBackAndALateAttemptNeverReplacesIt(_ backend: Backend) throws {
        let fixture = try Fixture(backend)
        defer { fixture.remove() }
        let store = try Self.store(of: fixture.queue, in: fixture.directory)
        let id = try fixture.queue.enqueue(fixture.jobs(1)).inserted[0]
        let first = try fixture.queue.claim(owner: "a", limit: 1, leaseDuration: 1_000)[0]
        let late = Self.bytes(300, seed: 1)
        _ = try store.putResult(late, job: id, attempt: first.attempt)
        // The lease expires; another worker's attempt 2 stores and completes; attempt 1's late completion is refused.
        fixture.clock.advance(2_000)
        let second = try fixture.queue.claim(owner: "b", limit: 1, leaseDuration: 60_000)[0]
        let accepted = Self.bytes(500, seed: 2)
        let stored = try store.putResult(accepted, job: id, attempt: second.attempt)
        #expect(stored.sha256 == Self.sha256(accepted))
        #expect(try fixture.queue.complete(job: id, attempt: second.attempt, owner: "b",
                                           output: JobOutput(path: stored.path, sha256: stored.sha256)))
        #expect(try !fixture.queue.complete(job: id, attempt: first.attempt, owner: "a", output: JobOutput(path: nil, sha256: Self.sha256(late))))
        try store.removeResult(job: id, attempt: first.attempt)
        let job = try #require(try fixture.queue.job(id: id))
        #expect(job.outputSHA256 == stored.sha256 && job.outputPath == stored.path)
        #expect(try store.result(of: job) == accepted)
        // The same completion again (a retried reply) is still accepted and changes nothing.
        #expect(try fixture.queue.complete(job: id, attempt: second.attempt, owner: "b", output: JobOutput(path: stored.path, sha256: stored.sha256)))
        #expect(try store.result(of: try #require(try fixture.queue.job(id: id))) == accepted)
    }

    @Test(arguments: Backend.allCases)
    func aSnapshotIsReplacedWholeAndSeenFromAnotherConnection(_ backend: Backend) throws {
        let fixture = try Fixture(backend)
        defer { fixture.remove() }
        let store = try Self.store(of: fixture.queue, in: fixture.directory)
        let ids = try fixture.queue.enqueue(fixture.jobs(2)).inserted
        #expect(try store.snapshot(job: ids[0]) == nil)
        // Larger than two database chunks, then smaller than one: each read is exactly the last write.
        let large = Self.bytes(2 * PostgresArtifactStore.chunkSize + 12_345, seed: 3)
        try store.putSnapshot(large, job: ids[0])
        #expect(try store.snapshot(job: ids[0]) == large)
        let small = Self.bytes(777, seed: 4)
        try store.putSnapshot(small, job: ids[0])
        // Another worker (another queue object: another connection, or another process on the files) reads it.
        let elsewhere = try Self.store(of: try fixture.reopen(), in: fixture.directory)
        #expect(try elsewhere.snapshot(job: ids[0]) == small)
        #expect(try elsewhere.snapshot(job: ids[1]) == nil)
        try store.removeSnapshot(job: ids[0])
        #expect(try elsewhere.snapshot(job: ids[0]) == nil)
        try store.removeSnapshot(job: ids[0])
        try store.putSnapshot(Data(), job: ids[1])
        #expect(try store.snapshot(job: ids[1]) == Data())
    }

    @Test(arguments: Backend.allCases)
    func framesAreAppendedAfterTheGoodBytesWithoutRewritingThem(_ backend: Backend) throws {
        let fixture = try Fixture(backend)
        defer { fixture.remove() }
        let store = try Self.store(of: fixture.queue, in: fixture.directory)
        let id = try fixture.queue.enqueue(fixture.jobs(1)).inserted[0]
        #expect(throws: (any Error).self) { try store.appendSnapshot(Self.bytes(10, seed: 1), job: id, after: 0) }
        let first = Self.bytes(PostgresArtifactStore.chunkSize + 100, seed: 2)
        try store.putSnapshot(first, job: id)
        // A frame larger than a database chunk, then a small one; each read is everything so far, from another connection too.
        let second = Self.bytes(PostgresArtifactStore.chunkSize + 7, seed: 3), third = Self.bytes(333, seed: 4)
        try store.appendSnapshot(second, job: id, after: first.count)
        try store.appendSnapshot(third, job: id, after: first.count + second.count)
        let elsewhere = try Self.store(of: try fixture.reopen(), in: fixture.directory)
        #expect(try elsewhere.snapshot(job: id) == first + second + third)
        // An append after fewer bytes than are stored drops the rest first; one after more than are stored is refused.
        let fourth = Self.bytes(50, seed: 5)
        try store.appendSnapshot(fourth, job: id, after: first.count + second.count)
        #expect(try store.snapshot(job: id) == first + second + fourth)
        #expect(throws: (any Error).self) { try store.appendSnapshot(fourth, job: id, after: first.count + second.count + 2 * fourth.count) }
        #expect(try store.snapshot(job: id) == first + second + fourth)
        // A whole snapshot replaces the appended one.
        try store.putSnapshot(third, job: id)
        #expect(try elsewhere.snapshot(job: id) == third)
    }

    @Test func storedResultsAndSnapshotsGoWithTheirPrunedJobs() throws {
        let fixture = try Fixture(.postgres)
        defer { fixture.remove() }
        let store = try #require(fixture.queue.storedArtifacts)
        let id = try fixture.queue.enqueue(fixture.jobs(1)).inserted[0]
        let job = try fixture.queue.claim(owner: "w", limit: 1, leaseDuration: 60_000)[0]
        try store.putSnapshot(Self.bytes(100, seed: 5), job: id)
        let stored = try store.putResult(Self.bytes(100, seed: 6), job: id, attempt: job.attempt)
        #expect(try fixture.queue.complete(job: id, attempt: job.attempt, owner: "w", output: JobOutput(path: nil, sha256: stored.sha256)))
        fixture.clock.advance(10)
        #expect(try fixture.queue.prune(olderThan: 1).deleted == 1)
        let database = String(fixture.location.split(separator: "/").last!)
        let left = try TestPostgres.shared().psql("""
            SELECT (SELECT count(*) FROM dllava.result) + (SELECT count(*) FROM dllava.snapshot) + (SELECT count(*) FROM dllava.snapshot_chunk)
            """, database: database)
        #expect(left.trimmingCharacters(in: .whitespacesAndNewlines) == "0")
    }

    @Test func aDamagedStoredSnapshotIsRefusedWithWhereItIs() throws {
        let fixture = try Fixture(.postgres)
        defer { fixture.remove() }
        let store = try #require(fixture.queue.storedArtifacts)
        let id = try fixture.queue.enqueue(fixture.jobs(1)).inserted[0]
        let bytes = Self.bytes(PostgresArtifactStore.chunkSize + 10, seed: 7)
        try store.putSnapshot(bytes, job: id)
        let database = String(fixture.location.split(separator: "/").last!)
        // Chunks stored before migration v3-snapshot-frames have no sha256 of their own: the whole's is checked.
        try TestPostgres.shared().psql("UPDATE dllava.snapshot_chunk SET sha256 = NULL", database: database)
        #expect(try store.snapshot(job: id) == bytes)
        try TestPostgres.shared().psql("UPDATE dllava.snapshot_chunk SET bytes = '\\x00' WHERE chunk_index = 1", database: database)
        #expect(throws: JobQueueError.corruptArtifact(location: store.snapshotLocation(job: id),
                                                      reason: "its chunks do not add up to the \(PostgresArtifactStore.chunkSize + 10) bytes "
                                                          + "in 2 chunks with the checksums recorded")) {
            try store.snapshot(job: id)
        }
    }
}
