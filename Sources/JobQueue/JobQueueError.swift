import Foundation

/// Failures of the queue itself (database errors from SQLite come through as GRDB's `DatabaseError`).
public enum JobQueueError: Error, Sendable, Equatable, CustomStringConvertible {
    /// No database file at the path (only `init` creates one).
    case noDatabase(path: String)
    /// The database holds migrations this build does not know: a newer dllava made it.
    case newerSchema(path: String)
    /// A row that cannot be read back (unknown state, bad JSON).
    case corruptRow(id: Int64, reason: String)
    /// A job that cannot be enqueued (bad parameters, empty prompt, ...).
    case invalidJob(reason: String)
    /// The file is not a dllava queue (not SQLite, or an SQLite database without the queue's tables); nothing was
    /// written to it.
    case notAQueue(path: String, reason: String)
    /// The queue lacks migrations this build applies, and it was opened read-only.
    case olderSchema(path: String)
    /// The database has the queue's tables but not their required content (its identity row).
    case corruptQueue(path: String, reason: String)

    public var description: String {
        switch self {
        case let .noDatabase(path): "no queue database at \(path): create it with `dllava init --db \(path)`"
        case let .newerSchema(path): "\(path) was made by a newer dllava (its schema has migrations this build does not know)"
        case let .corruptRow(id, reason): "job \(id) cannot be read: \(reason)"
        case let .invalidJob(reason): "invalid job: \(reason)"
        case let .notAQueue(path, reason): "\(path) is not a dllava queue database (\(reason)); it was left unchanged"
        case let .olderSchema(path): "\(path) was made by an older dllava: upgrade it with `dllava init --db \(path)` (or any command that changes jobs)"
        case let .corruptQueue(path, reason): "\(path) is not a usable queue database: \(reason)"
        }
    }
}
