import Crypto
import Foundation
import JobQueue
import PostgresNIO

/// The PostgreSQL queue's result records and KV snapshots, in its database (migration `v2-stored-artifacts`): workers
/// on any machine read and write them through the connection string alone.
///
/// - A result is one row of `dllava.result` per (job, attempt) with the compressed record and its sha256.
/// - A snapshot is a `dllava.snapshot` row (size, chunk count, sha256 of the whole) and its bytes in
///   `dllava.snapshot_chunk` rows of at most `chunkSize` bytes, each with its sha256 (a bytea value is limited to
///   1 GiB, and smaller pieces keep each message to the server modest). `putSnapshot` replaces all of it in one
///   transaction; `appendSnapshot` adds chunk rows for a frame in one transaction, never rewriting the chunks before
///   (the whole's sha256 is then NULL: each chunk's is checked); `snapshot` reads it in one REPEATABLE READ
///   transaction and checks size, chunk count and checksums, so a reader never sees half of a write.
///
/// Each call is one transaction on the store's own connection (beside the queue's), run again after a lost connection
/// like every queue operation. Snapshot writes are not fenced by the lease: a worker that lost its job may still write its snapshot,
/// which is a valid state of the same job (the snapshot's identity names it) and resumes to the same output.
public struct PostgresArtifactStore: ArtifactStore {
    /// Bytes per `dllava.snapshot_chunk` row.
    public static let chunkSize = 8 << 20

    let session: PostgresSession
    let clock: QueueClock

    public var location: String { session.address.description }

    public func putResult(_ record: Data, job: Int64, attempt: Int) throws -> StoredResult {
        let sha256 = Self.sha256(record)
        let now = clock.now()
        try session.statement { statements in
            try statements.execute("""
                INSERT INTO dllava.result (job_id, attempt, sha256, record, stored_at) VALUES (\(job), \(attempt)::integer, \(sha256), \(record), \(now))
                ON CONFLICT (job_id, attempt) DO UPDATE SET sha256 = EXCLUDED.sha256, record = EXCLUDED.record, stored_at = EXCLUDED.stored_at
                """)
        }
        return StoredResult(path: nil, sha256: sha256)
    }

    public func result(of job: Job) throws -> Data? {
        try session.statement { statements in
            try statements.rows("SELECT record FROM dllava.result WHERE job_id = \(job.id) AND attempt = \(job.attempt)::integer")
                .first?.decode(Data.self)
        }
    }

    public func removeResult(job: Int64, attempt: Int) throws {
        try session.statement { try $0.execute("DELETE FROM dllava.result WHERE job_id = \(job) AND attempt = \(attempt)::integer") }
    }

    public func putSnapshot(_ snapshot: Data, job: Int64) throws {
        let sha256 = Self.sha256(snapshot)
        let now = clock.now()
        let chunks = Self.chunks(snapshot)
        try session.transaction { statements in
            try statements.execute("DELETE FROM dllava.snapshot_chunk WHERE job_id = \(job)")
            try statements.execute("""
                INSERT INTO dllava.snapshot (job_id, bytes, chunks, sha256, stored_at)
                VALUES (\(job), \(Int64(snapshot.count)), \(chunks.count)::integer, \(sha256), \(now))
                ON CONFLICT (job_id) DO UPDATE SET bytes = EXCLUDED.bytes, chunks = EXCLUDED.chunks, sha256 = EXCLUDED.sha256,
                                                   stored_at = EXCLUDED.stored_at
                """)
            for (index, chunk) in chunks.enumerated() {
                try Self.insert(chunk, job: job, index: index, statements)
            }
        }
    }

    /// Adds the frame's chunk rows after the stored ones, in one transaction. The store never holds a torn tail (a
    /// transaction is whole or absent), so the stored snapshot has exactly `offset` bytes; should it have more (a
    /// worker that lost the job appended meanwhile), it is read and stored again whole, cut at `offset`, with the frame.
    public func appendSnapshot(_ frame: Data, job: Int64, after offset: Int) throws {
        let location = snapshotLocation(job: job), now = clock.now()
        let chunks = Self.chunks(frame)
        let appended = try session.transaction { statements -> Bool in
            guard let header = try statements.rows("SELECT bytes, chunks FROM dllava.snapshot WHERE job_id = \(job) FOR UPDATE").first else {
                throw JobQueueError.corruptArtifact(location: location, reason: "there is none to append to")
            }
            let (bytes, count) = try header.decode((Int64, Int32).self)
            guard bytes <= Int64(offset) else { return false }
            guard bytes == Int64(offset) else {
                throw JobQueueError.corruptArtifact(location: location, reason: "it has \(bytes) bytes, fewer than the \(offset) written before")
            }
            for (index, chunk) in chunks.enumerated() {
                try Self.insert(chunk, job: job, index: Int(count) + index, statements)
            }
            try statements.execute("""
                UPDATE dllava.snapshot SET bytes = bytes + \(Int64(frame.count)), chunks = chunks + \(chunks.count)::integer, sha256 = NULL,
                                           stored_at = \(now)
                WHERE job_id = \(job)
                """)
            return true
        }
        if !appended, let stored = try snapshot(job: job) {
            try putSnapshot(stored.prefix(offset) + frame, job: job)
        }
    }

    /// `data` in pieces of at most `chunkSize` bytes.
    static func chunks(_ data: Data) -> [Data] {
        stride(from: 0, to: data.count, by: chunkSize).map { start in
            data.subdata(in: data.startIndex + start ..< data.startIndex + min(start + chunkSize, data.count))
        }
    }

    static func insert(_ chunk: Data, job: Int64, index: Int, _ statements: PostgresStatements) throws {
        try statements.execute("""
            INSERT INTO dllava.snapshot_chunk (job_id, chunk_index, bytes, sha256) VALUES (\(job), \(index)::integer, \(chunk), \(sha256(chunk)))
            """)
    }

    public func snapshot(job: Int64) throws -> Data? {
        let location = snapshotLocation(job: job)
        return try session.transaction(readOnly: true) { statements -> Data? in
            guard let header = try statements.rows("SELECT bytes, chunks, sha256 FROM dllava.snapshot WHERE job_id = \(job)").first else { return nil }
            let (bytes, chunks, sha256) = try header.decode((Int64, Int32, String?).self)
            var snapshot = Data()
            var count = 0
            var chunksIntact = true
            for row in try statements.rows("SELECT bytes, sha256 FROM dllava.snapshot_chunk WHERE job_id = \(job) ORDER BY chunk_index") {
                let (chunk, chunkSHA256) = try row.decode((Data, String?).self)
                guard snapshot.count + chunk.count <= bytes else { break }
                if let chunkSHA256, Self.sha256(chunk) != chunkSHA256 { chunksIntact = false }
                snapshot.append(chunk)
                count += 1
            }
            guard count == Int(chunks), snapshot.count == Int(bytes), chunksIntact, sha256.map({ Self.sha256(snapshot) == $0 }) ?? true else {
                throw JobQueueError.corruptArtifact(location: location, reason: "its chunks do not add up to the \(bytes) bytes in \(chunks) chunks "
                                                    + "with the checksums recorded")
            }
            return snapshot
        }
    }

    public func removeSnapshot(job: Int64) throws {
        try session.statement { try $0.execute("DELETE FROM dllava.snapshot WHERE job_id = \(job)") }
    }

    public func snapshotLocation(job: Int64) -> String { "the snapshot of job \(job) in \(location)" }

    static func sha256(_ data: Data) -> String {
        SHA256.hash(data: data).map { String(format: "%02x", $0) }.joined()
    }
}
