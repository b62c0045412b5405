// The two ways a worker keeps results and snapshots that are not the queue's own storage: the files of an SQLite
// queue under `--out`, and the result files a PostgreSQL worker also writes where `--out` says.
import Artifacts
import Foundation
import JobQueue

/// Results and snapshots as files under `<out>/<queue id>/`: results `<job id>-<attempt>.json.zst`, snapshots
/// `snapshots/job-<job id>.kv.zst`, each written atomically; a snapshot's later frames are appended in place
/// (`AppendFile`). The SQLite queue's storage (`ArtifactStore`), on one
/// machine. Job ids are never reused within a queue and the identity is a UUID, so neither a later job nor another
/// queue sharing `out` can write or read these names. A job's snapshot path is recorded in its row before the first
/// write after each read of its snapshot (the daemon reads it when the job enters a batch), so `prune
/// --delete-outputs` finds the file even if the writer dies right after, and one job's snapshots cost one record.
public final class DirectoryArtifactStore: ArtifactStore, @unchecked Sendable {
    public let queue: JobQueue
    public let results: ResultFile
    public let snapshotDirectory: URL
    private let lock = NSLock()
    private var recordedSnapshotPaths: Set<Int64> = []

    /// The store of `queue` under `out`; creates `<out>/<queue id>/snapshots` when missing, refusing
    /// a path on the way that is not a folder (`OutputPath`). `identity` is the queue's
    /// own unless given (`dllava copy` writes under the identity the copy takes).
    public init(queue: JobQueue, out: URL, identity: String? = nil) throws {
        self.queue = queue
        results = try ResultFile(directory: Self.queueDirectory(out: out, queue: identity ?? queue.identity))
        snapshotDirectory = results.directory.appendingPathComponent("snapshots")
        try OutputPath.makeDirectory(snapshotDirectory)
    }

    /// `<out>/<queue identity>`: where one queue's result and snapshot files live.
    public static func queueDirectory(out: URL, queue identity: String) -> URL { out.appendingPathComponent(identity) }

    public var location: String { results.directory.path }

    public func snapshotURL(job: Int64) -> URL { snapshotDirectory.appendingPathComponent("job-\(job).kv.zst") }

    public func putResult(_ record: Data, job: Int64, attempt: Int) throws -> StoredResult {
        let url = results.url(job: job, attempt: attempt)
        do {
            let written = try AtomicFile.write(record, to: url)
            return StoredResult(path: written.url.path, sha256: written.sha256)
        } catch let error as ArtifactError {
            throw ArtifactError.inFile(path: url.path, error)
        }
    }

    /// The file the job's row records (wherever its `--out` was), or nil when it records none.
    public func result(of job: Job) throws -> Data? {
        guard let path = job.outputPath else { return nil }
        return try Self.read(URL(fileURLWithPath: path))
    }

    public func removeResult(job: Int64, attempt: Int) throws {
        try Self.remove(results.url(job: job, attempt: attempt))
    }

    public func putSnapshot(_ snapshot: Data, job: Int64) throws {
        let url = snapshotURL(job: job)
        try recordSnapshotPath(job: job, url: url)
        _ = try AtomicFile.write(snapshot, to: url)
    }

    /// Records the snapshot's path in the job's row, once after each read of its snapshot.
    private func recordSnapshotPath(job: Int64, url: URL) throws {
        if !lock.withLock({ recordedSnapshotPaths.contains(job) }) {
            try queue.recordSnapshotPath(job: job, path: url.path)
            lock.withLock { _ = recordedSnapshotPaths.insert(job) }
        }
    }

    public func appendSnapshot(_ frame: Data, job: Int64, after offset: Int) throws {
        let url = snapshotURL(job: job)
        try recordSnapshotPath(job: job, url: url)
        try AppendFile.append(frame, to: url, at: offset)
    }

    public func snapshot(job: Int64) throws -> Data? {
        lock.withLock { _ = recordedSnapshotPaths.remove(job) }
        let url = snapshotURL(job: job)
        guard FileManager.default.fileExists(atPath: url.path) else { return nil }
        return try Self.read(url)
    }

    public func removeSnapshot(job: Int64) throws {
        try Self.remove(snapshotURL(job: job))
    }

    public func snapshotLocation(job: Int64) -> String { snapshotURL(job: job).path }

    static func read(_ url: URL) throws -> Data {
        do { return try Data(contentsOf: url) } catch {
            throw ArtifactError.io(path: url.path, operation: "read", reason: (error as NSError).localizedFailureReason ?? error.localizedDescription)
        }
    }

    static func remove(_ url: URL) throws {
        if unlink(url.path) != 0 && errno != ENOENT {
            throw ArtifactError.io(path: url.path, operation: "delete", reason: String(cString: strerror(errno)))
        }
    }
}

/// A store that keeps everything in `stored` (the queue's database) and also writes each result as a file under
/// `<out>/<queue id>/`, as the user asked with `--out`; the job row records that file. Snapshots stay in `stored`.
public struct ResultFileMirror: ArtifactStore {
    public let stored: ArtifactStore
    public let files: DirectoryArtifactStore

    public init(stored: ArtifactStore, files: DirectoryArtifactStore) {
        self.stored = stored
        self.files = files
    }

    public var location: String { stored.location }

    public func putResult(_ record: Data, job: Int64, attempt: Int) throws -> StoredResult {
        let file = try files.putResult(record, job: job, attempt: attempt)
        do {
            let inDatabase = try stored.putResult(record, job: job, attempt: attempt)
            return StoredResult(path: file.path, sha256: inDatabase.sha256)
        } catch {
            try? files.removeResult(job: job, attempt: attempt)
            throw error
        }
    }

    public func result(of job: Job) throws -> Data? { try stored.result(of: job) }

    public func removeResult(job: Int64, attempt: Int) throws {
        try stored.removeResult(job: job, attempt: attempt)
        try files.removeResult(job: job, attempt: attempt)
    }

    public func putSnapshot(_ snapshot: Data, job: Int64) throws { try stored.putSnapshot(snapshot, job: job) }
    public func appendSnapshot(_ frame: Data, job: Int64, after offset: Int) throws { try stored.appendSnapshot(frame, job: job, after: offset) }
    public func snapshot(job: Int64) throws -> Data? { try stored.snapshot(job: job) }
    public func removeSnapshot(job: Int64) throws { try stored.removeSnapshot(job: job) }
    public func snapshotLocation(job: Int64) -> String { stored.snapshotLocation(job: job) }
}
