import Foundation
import GRDB

/// Failures of the queue, SQLite's and PostgreSQL's included (as `database`): callers never see GRDB's or
/// PostgresNIO's error types. `path` is the queue's location (a file, or a connection URL without its password).
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
    /// A queue location that cannot be used at all (a malformed `postgres://` URL).
    case badLocation(location: String, reason: String)
    /// A PostgreSQL connection that its settings rule out (a password file others can read, a missing root
    /// certificate, a server certificate that fails verification, TLS required of a server without it).
    case connectionSettings(location: String, reason: String)
    /// A stored result or snapshot that does not read back as it was stored (`location` names it).
    case corruptArtifact(location: String, reason: String)
    /// The database failed (`message` is its text).
    case database(path: String, failure: DatabaseFailure, message: String)

    /// What kind of SQLite failure a `database` error is: what the caller can do about it differs.
    public enum DatabaseFailure: String, Sendable, Equatable {
        /// Another process held the database longer than the busy timeout: try again.
        case busy
        /// The disk is full.
        case full
        /// A read or write of the file failed.
        case ioError
        /// The file is not an SQLite database, or is damaged.
        case notADatabase
        /// The file cannot be opened (for writing).
        case cannotOpen
        /// The database server cannot be reached, or the connection to it was lost and could not be restored in time.
        case unreachable
        case other
    }

    init(_ error: DatabaseError, path: String) {
        let failure: DatabaseFailure = switch error.resultCode {
        case .SQLITE_BUSY, .SQLITE_LOCKED: .busy
        case .SQLITE_FULL: .full
        case .SQLITE_IOERR: .ioError
        case .SQLITE_NOTADB, .SQLITE_CORRUPT: .notADatabase
        case .SQLITE_CANTOPEN, .SQLITE_READONLY, .SQLITE_PERM: .cannotOpen
        default: .other
        }
        self = .database(path: path, failure: failure, message: error.message ?? "\(error.resultCode)")
    }

    public var description: String {
        switch self {
        case let .noDatabase(path): "no queue database at \(path): create it with `dllava init --db \(path)`"
        case let .newerSchema(path): "\(path) was made by a newer dllava (its schema has migrations this build does not know)"
        case let .corruptRow(id, reason): "job \(id) cannot be read: \(reason)"
        case let .invalidJob(reason): "invalid job: \(reason)"
        case let .notAQueue(path, reason): "\(path) is not a dllava queue database (\(reason)); it was left unchanged"
        case let .olderSchema(path): "\(path) was made by an older dllava: upgrade it with `dllava init --db \(path)` (or any command that changes jobs)"
        case let .database(path, failure, message):
            switch failure {
            case .busy: "the queue database \(path) is busy (another process held it too long); try again"
            case .full: "the disk holding the queue database \(path) is full; free space and try again"
            case .ioError: "cannot write the queue database \(path): \(message)"
            case .notADatabase: "\(path) is not a usable queue database: \(message)"
            case .cannotOpen: "cannot open the queue database \(path) for writing: \(message)"
            case .unreachable: "cannot reach the queue database \(path): \(message); try again when the server is back"
            case .other: "queue database \(path): \(message)"
            }
        case let .corruptQueue(path, reason): "\(path) is not a usable queue database: \(reason)"
        case let .badLocation(location, reason): "\(location) is not a usable queue location: \(reason)"
        case let .connectionSettings(location, reason): "cannot connect to \(location) as configured: \(reason)"
        case let .corruptArtifact(location, reason): "\(location) is damaged: \(reason)"
        }
    }
}
