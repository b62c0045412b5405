import Foundation

/// Where a queue's result records and KV snapshots are kept, keyed by job id. One contract with two kinds of storage
/// (the `ArtifactStore` tests run on both):
/// - in the database (`PostgresJobQueue.storedArtifacts`: tables `dllava.result`, `dllava.snapshot` and
///   `dllava.snapshot_chunk`), so workers on many machines need nothing but the connection string and a job
///   interrupted on one machine resumes on another from its snapshot;
/// - as files under `<out>/<queue id>/` (`DirectoryArtifactStore` in BatchDaemon): the SQLite queue's storage, for
///   workers on one machine (its job rows record the paths).
///
/// The bytes are opaque here: a result is the zstd-compressed result record (`ResultFile`), a snapshot the encoded
/// snapshot file (`SnapshotFile`), which carries its own identity and checksums. A snapshot grows by frames:
/// `putSnapshot` replaces the job's snapshot atomically (a reader sees the old one or the new one, never a mix), and
/// `appendSnapshot` adds a frame after the bytes its writer knows to be good, never rewriting them.
public protocol ArtifactStore: Sendable {
    /// Where the store is, as messages name it.
    var location: String { get }

    /// Stores the compressed result record of `job`'s `attempt` (replacing one stored for the same attempt) and returns
    /// what `complete` records for it. Each attempt has its own place, so a late write from an attempt whose lease was
    /// rescued never replaces the accepted one.
    func putResult(_ record: Data, job: Int64, attempt: Int) throws -> StoredResult
    /// The stored result record of `job`'s recorded success (the attempt it succeeded with), as stored, or nil when
    /// this store holds none for it. The caller checks it against `job.outputSHA256`.
    func result(of job: Job) throws -> Data?
    /// Removes what `putResult` stored for that attempt (a completion the queue refused, or failed to record).
    func removeResult(job: Int64, attempt: Int) throws

    /// Stores `snapshot` as `job`'s latest snapshot, replacing the earlier one atomically.
    func putSnapshot(_ snapshot: Data, job: Int64) throws
    /// Adds `frame` to `job`'s snapshot after its first `offset` bytes (what its writer stored and knows to be good),
    /// dropping whatever follows them first (a frame an interrupted append left half written). Throws, storing
    /// nothing, when the stored snapshot is missing or shorter than `offset`; the writer then stores a whole one.
    func appendSnapshot(_ frame: Data, job: Int64, after offset: Int) throws
    /// `job`'s latest snapshot, or nil when it has none.
    func snapshot(job: Int64) throws -> Data?
    /// Removes `job`'s snapshot; nothing happens when it has none.
    func removeSnapshot(job: Int64) throws
    /// Where `job`'s snapshot is (a file path, or the database and job), for messages.
    func snapshotLocation(job: Int64) -> String
}

/// What `ArtifactStore.putResult` stored: the file the job row records (nil when the record lives only in the
/// database) and the sha256 of the stored bytes.
public struct StoredResult: Sendable, Hashable {
    public var path: String?
    public var sha256: String

    public init(path: String?, sha256: String) {
        self.path = path
        self.sha256 = sha256
    }
}
