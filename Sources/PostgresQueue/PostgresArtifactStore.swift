import Crypto
import Foundation
import JobQueue
import PostgresNIO

/// The PostgreSQL queue's result records and KV snapshots, in its database (migration `v2-stored-artifacts`): workers
/// on any machine read and write them through the connection string alone.
///
/// - A result is one row of `dllava.result` per (job, attempt) with the compressed record and its sha256.
/// - A snapshot is a `dllava.snapshot` row (size, chunk count, sha256 of the whole) and its bytes in
///   `dllava.snapshot_chunk` rows of `chunkSize` bytes (a bytea value is limited to 1 GiB, and smaller pieces keep
///   each message to the server modest). `putSnapshot` replaces all of it in one transaction; `snapshot` reads it in
///   one REPEATABLE READ transaction and checks size, chunk count and sha256, so a reader never sees half of a write.
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
        let chunks = stride(from: 0, to: snapshot.count, by: Self.chunkSize).map { start in
            snapshot.subdata(in: snapshot.startIndex + start ..< snapshot.startIndex + min(start + Self.chunkSize, snapshot.count))
        }
        try session.transaction { statements in
            try statements.execute("DELETE FROM dllava.snapshot_chunk WHERE job_id = \(job)")
            try statements.execute("""
                INSERT INTO dllava.snapshot (job_id, bytes, chunks, sha256, stored_at)
                VALUES (\(job), \(Int64(snapshot.count)), \(chunks.count)::integer, \(sha256), \(now))
                ON CONFLICT (job_id) DO UPDATE SET bytes = EXCLUDED.bytes, chunks = EXCLUDED.chunks, sha256 = EXCLUDED.sha256,
                                                   stored_at = EXCLUDED.stored_at
                """)
            for (index, chunk) in chunks.enumerated() {
                try statements.execute("INSERT INTO dllava.snapshot_chunk (job_id, chunk_index, bytes) VALUES (\(job), \(index)::integer, \(chunk))")
            }
        }
    }

    /// Not yet appended in place: the stored snapshot is read and stored again, with the frame, in one `putSnapshot`.
    public func appendSnapshot(_ frame: Data, job: Int64, after offset: Int) throws {
        guard let stored = try snapshot(job: job), stored.count >= offset else {
            throw JobQueueError.corruptArtifact(location: snapshotLocation(job: job), reason: "it is missing or shorter than the \(offset) bytes written before")
        }
        try putSnapshot(stored.prefix(offset) + frame, job: job)
    }

    public func snapshot(job: Int64) throws -> Data? {
        let location = snapshotLocation(job: job)
        return try session.transaction(readOnly: true) { statements -> Data? in
            guard let header = try statements.rows("SELECT bytes, chunks, sha256 FROM dllava.snapshot WHERE job_id = \(job)").first else { return nil }
            let (bytes, chunks, sha256) = try header.decode((Int64, Int32, String).self)
            var snapshot = Data()
            var count = 0
            for row in try statements.rows("SELECT bytes FROM dllava.snapshot_chunk WHERE job_id = \(job) ORDER BY chunk_index") {
                let chunk = try row.decode(Data.self)
                guard snapshot.count + chunk.count <= bytes else { break }
                snapshot.append(chunk)
                count += 1
            }
            guard count == Int(chunks), snapshot.count == Int(bytes), Self.sha256(snapshot) == sha256 else {
                throw JobQueueError.corruptArtifact(location: location, reason: "its chunks do not add up to the \(bytes) bytes in \(chunks) chunks "
                                                    + "with the sha256 its header records")
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
