import ArgumentParser
import Artifacts
import BatchDaemon
import Foundation
import JobQueue
import PostgresQueue

/// The queue commands, registered beside `generate` in `DLLaVA`.
let queueSubcommands: [ParsableCommand.Type] = [
    InitCommand.self, EnqueueCommand.self, StatusCommand.self, ListCommand.self, ShowCommand.self,
    RetryCommand.self, CancelCommand.self, ExportCommand.self, PruneCommand.self, CopyCommand.self, ReportCommand.self,
]

extension JobState: ExpressibleByArgument {}

/// `--db`, shared by every queue command: an SQLite file, or a PostgreSQL queue's `postgres://` URL.
struct DatabaseOptions: ParsableArguments {
    @Option(name: .customLong("db"), help: ArgumentHelp(
        "Queue: an SQLite file, or postgres://user@host[:port]/database[?sslmode=MODE&sslrootcert=FILE] for a queue that "
            + "workers on many machines share, its password from $PGPASSWORD or ~/.pgpass ($PGPASSFILE), never the command line "
            + "(default: $DLLAVA_DB, else ./dllava.sqlite).", valueName: "path-or-url"))
    var database: String?

    @Option(name: .customLong("busy-timeout"), help: """
        Seconds to wait for another process's write before giving up (exit 75); on PostgreSQL, also how long to keep \
        reconnecting to a server that cannot be reached.
        """)
    var busyTimeout: Double = 10

    func validate() throws {
        guard busyTimeout >= 0 else { throw ValidationError("--busy-timeout must not be negative") }
    }

    /// The location as given (a PostgreSQL URL may hold a password: show `path` instead).
    var location: String {
        database ?? ProcessInfo.processInfo.environment["DLLAVA_DB"] ?? "dllava.sqlite"
    }

    var isPostgres: Bool { PostgresAddress.isPostgres(location) }

    /// The location as messages name it: the file path, or the URL with its password hidden.
    var path: String { Self.displayed(location) }

    /// `create` for `init` only; `readOnly` for commands that never change the queue (`status`, `list`, `show`,
    /// `export`), which then work on a read-only file and never write to it.
    func open(create: Bool = false, readOnly: Bool = false) throws -> JobQueue {
        try Self.open(location, access: create ? .create : readOnly ? .readOnly : .readWrite, busyTimeout: busyTimeout)
    }

    /// The queue at `location`: a `postgres://` URL opens the PostgreSQL queue (reconnecting for up to `busyTimeout`
    /// seconds, and saying so on stderr), anything else the SQLite file.
    static func open(_ location: String, access: SQLiteJobQueue.Access, busyTimeout: Double) throws -> JobQueue {
        if PostgresAddress.isPostgres(location) {
            return try PostgresJobQueue(url: location, access: access, reconnectWindow: busyTimeout, report: writeStandardError)
        }
        return try SQLiteJobQueue(path: location, access: access, busyTimeout: busyTimeout)
    }

    /// `location` as messages name it: a file path as it is, a URL with its password hidden.
    static func displayed(_ location: String) -> String {
        guard PostgresAddress.isPostgres(location) else { return location }
        return (try? PostgresAddress(location).description) ?? location
    }
}

/// Which jobs `retry` and `cancel` touch: ids, custom ids, states; at least one must be given.
struct SelectionOptions: ParsableArguments {
    @Argument(help: "Job ids.")
    var ids: [Int64] = []

    @Option(name: .customLong("custom-id"), help: "A job's custom_id (repeatable).")
    var customIDs: [String] = []

    @Option(help: "Only jobs in this state (repeatable): \(JobState.allCases.map(\.rawValue).joined(separator: ", ")).")
    var state: [JobState] = []

    var filter: JobFilter {
        JobFilter(ids: ids.isEmpty ? nil : ids, customIDs: customIDs.isEmpty ? nil : customIDs,
                  states: state.isEmpty ? nil : Set(state))
    }
}

/// `OutputPath.checkFile` for the file a command's `option` names, before any work: a refusal is exit 64 naming the
/// option and the path. `database`'s file and its -wal, -shm and -journal names are refused too.
func checkOutputFile(_ path: String, option: String, database: DatabaseOptions?) throws {
    let databases = database.map { $0.isPostgres ? [] : [$0.location] } ?? []
    do {
        try OutputPath.checkFile(path, protecting: databases)
    } catch {
        throw CommandFailure(message: "\(option) \(error)", code: 64)
    }
}

/// `OutputPath.checkDirectory` for the folder a command's `option` names: a refusal is exit 64.
func checkOutputDirectory(_ path: String, option: String) throws {
    do {
        try OutputPath.checkDirectory(path)
    } catch {
        throw CommandFailure(message: "\(option) \(error)", code: 64)
    }
}

/// Runs a queue command body, mapping its errors to one sentence and a sysexits code (`queueCommandFailure`).
func runQueueCommand(_ command: some ParsableCommand, database: String, _ body: () throws -> Void) throws {
    try command.reportingFailures {
        do {
            try body()
        } catch let failure as CommandFailure {
            throw failure
        } catch {
            throw queueCommandFailure(error, database: database)
        }
    }
}

/// The one place queue, manifest, artifact, daemon and SQLite errors get their sentence and exit code: 64 an output
/// path refused (`OutputPath`), 65 bad data, 74 I/O error (a full disk, a file that cannot be written), 75 database
/// busy, 78 configuration (no database, not a queue, another schema), 1 anything else.
func queueCommandFailure(_ error: Error, database: String) -> CommandFailure {
    switch error {
    case let error as JobQueueError:
        switch error {
        case .noDatabase, .newerSchema, .olderSchema, .notAQueue, .corruptQueue, .connectionSettings:
            return CommandFailure(message: error.description, code: 78)
        case .corruptRow, .invalidJob, .corruptArtifact: return CommandFailure(message: "\(database): \(error)", code: 65)
        case .badLocation: return CommandFailure(message: error.description, code: 64)
        case .database(_, let failure, _):
            let code: Int32 = switch failure {
            case .busy, .unreachable: 75
            case .full, .ioError: 74
            case .notADatabase, .cannotOpen: 78
            case .other: 1
            }
            return CommandFailure(message: error.description, code: code)
        }
    case let error as ManifestError:
        return CommandFailure(message: error.description, code: 65)
    case let error as QueueCopyError:
        if case .needsOutputFolder = error { return CommandFailure(message: error.description, code: 64) }
        return CommandFailure(message: error.description, code: 65)
    case let error as ManifestInterrupted:
        let cause = queueCommandFailure(error.underlying, database: database)
        return CommandFailure(message: "\(cause.message); \(error.file): \(error.inserted) job\(error.inserted == 1 ? " was" : "s were") enqueued "
                              + "(committed) before the failure; run the same command again to enqueue the rest (jobs already queued are skipped)",
                              code: cause.code)
    case let error as DaemonFault:
        return CommandFailure(message: error.description, code: 74)
    case let error as ArtifactError:
        if case .refusedOutput = error { return CommandFailure(message: error.description, code: 64) }
        if case .inFile(_, .refusedOutput) = error { return CommandFailure(message: error.description, code: 64) }
        if case .io = error { return CommandFailure(message: error.description, code: 74) }
        if case .inFile(_, .io) = error { return CommandFailure(message: error.description, code: 74) }
        return CommandFailure(message: error.description, code: 65)
    default:
        let (message, code) = describe(error)
        return CommandFailure(message: message, code: code)
    }
}

func printJSON(_ value: some Encodable) throws {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
    print(String(decoding: try encoder.encode(value), as: UTF8.self))
}

func writeStandardError(_ line: String) {
    FileHandle.standardError.write(Data("dllava: \(line)\n".utf8))
}

/// Why an orphaned job's worker is taken for gone.
func orphanReason(_ orphan: OrphanedJob) -> String {
    switch orphan.liveness {
    case .dead(let reason): reason
    case .silent(let since): "no heartbeat since \(timestamp(since))"
    case .alive: "alive"
    }
}

/// One sentence on an orphaned job: whose it was, why that worker is gone, and when the job is reclaimed.
func orphanNote(_ orphan: OrphanedJob) -> String {
    let expiry = timestamp(orphan.leaseExpiresAt)
    switch orphan.liveness {
    case .dead:
        return "worker \(orphan.owner) is gone (\(orphanReason(orphan))); the next `dllava run` on \(orphan.host) reclaims it at once, "
            + "any other when its lease expires at \(expiry)"
    default:
        return "worker \(orphan.owner) on \(orphan.host) is silent (\(orphanReason(orphan))); reclaimed when its lease expires at \(expiry)"
    }
}

/// Unix milliseconds as ISO 8601 UTC with milliseconds.
func timestamp(_ milliseconds: Int64) -> String {
    let formatter = ISO8601DateFormatter()
    formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
    return formatter.string(from: Date(timeIntervalSince1970: Double(milliseconds) / 1000))
}
