import ArgumentParser
import Artifacts
import BatchDaemon
import Foundation
import JobQueue

/// The queue commands, registered beside `generate` in `DLLaVA`.
let queueSubcommands: [ParsableCommand.Type] = [
    InitCommand.self, EnqueueCommand.self, StatusCommand.self, ListCommand.self, ShowCommand.self,
    RetryCommand.self, CancelCommand.self, ExportCommand.self, PruneCommand.self,
]

extension JobState: ExpressibleByArgument {}

/// `--db`, shared by every queue command.
struct DatabaseOptions: ParsableArguments {
    @Option(name: .customLong("db"), help: "Queue database (default: $DLLAVA_DB, else ./dllava.sqlite).")
    var database: String?

    @Option(name: .customLong("busy-timeout"), help: "Seconds to wait for another process's write before giving up (exit 75).")
    var busyTimeout: Double = 10

    func validate() throws {
        guard busyTimeout >= 0 else { throw ValidationError("--busy-timeout must not be negative") }
    }

    var path: String {
        database ?? ProcessInfo.processInfo.environment["DLLAVA_DB"] ?? "dllava.sqlite"
    }

    /// `create` for `init` only; `readOnly` for commands that never change the queue (`status`, `list`, `show`,
    /// `export`), which then work on a read-only file and never write to it.
    func open(create: Bool = false, readOnly: Bool = false) throws -> JobQueue {
        try JobQueue(path: path, access: create ? .create : readOnly ? .readOnly : .readWrite, busyTimeout: busyTimeout)
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

/// The one place queue, manifest, artifact, daemon and SQLite errors get their sentence and exit code: 65 bad data,
/// 74 I/O error (a full disk, a file that cannot be written), 75 database busy, 78 configuration (no database, not a
/// queue, another schema), 1 anything else.
func queueCommandFailure(_ error: Error, database: String) -> CommandFailure {
    switch error {
    case let error as JobQueueError:
        switch error {
        case .noDatabase, .newerSchema, .olderSchema, .notAQueue, .corruptQueue: return CommandFailure(message: error.description, code: 78)
        case .corruptRow, .invalidJob: return CommandFailure(message: "\(database): \(error)", code: 65)
        case .database(_, let failure, _):
            let code: Int32 = switch failure {
            case .busy: 75
            case .full, .ioError: 74
            case .notADatabase, .cannotOpen: 78
            case .other: 1
            }
            return CommandFailure(message: error.description, code: code)
        }
    case let error as ManifestError:
        return CommandFailure(message: error.description, code: 65)
    case let error as ManifestInterrupted:
        let cause = queueCommandFailure(error.underlying, database: database)
        return CommandFailure(message: "\(cause.message); \(error.file): \(error.inserted) job\(error.inserted == 1 ? " was" : "s were") enqueued "
                              + "(committed) before the failure; run the same command again to enqueue the rest (jobs already queued are skipped)",
                              code: cause.code)
    case let error as DaemonFault:
        return CommandFailure(message: error.description, code: 74)
    case let error as ArtifactError:
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

// MARK: init

struct InitCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "init", abstract: "Create a queue database, or bring an existing one's schema up to date.")

    @OptionGroup var database: DatabaseOptions

    func run() throws {
        try runQueueCommand(self, database: database.path) {
            let existed = FileManager.default.fileExists(atPath: database.path)
            let queue = try database.open(create: true)
            let schema = try queue.appliedMigrations().last ?? "none"
            print(existed ? "\(database.path) is ready (schema \(schema))" : "created \(database.path) (schema \(schema))")
        }
    }
}

// MARK: enqueue

struct EnqueueCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "enqueue", abstract: "Add jobs from a folder of images, a JSONL manifest or a CSV manifest.",
        discussion: """
        A JSONL line is {"custom_id": ..., "image": PATH, "prompt": TEXT, ...} with optional max_tokens, temperature, \
        top_p, top_k, seed, stop (a string or a list), sparsity, vision_keep_rate and priority; a CSV file has a header \
        row with the same column names. Relative image paths resolve against the manifest's folder. Parameter options \
        given here fill in what a line leaves out. A job whose custom_id (or, without one, whose image bytes, prompt and \
        parameters) is already queued is skipped, so enqueueing a manifest twice is harmless. Bad lines are reported \
        with their line number on stderr and the exit status is 65; the good lines are still enqueued.
        """)

    @OptionGroup var database: DatabaseOptions

    @Option(help: "Enqueue every .jpg, .jpeg and .png image in this folder (sorted by name), with --prompt.")
    var folder: String?

    @Option(help: "The prompt for every image of --folder.")
    var prompt: String?

    @Flag(help: "With --folder, include subfolders.")
    var recursive = false

    @Option(help: "A JSONL manifest.")
    var jsonl: String?

    @Option(help: "A CSV manifest (header row required).")
    var csv: String?

    @Option(name: .customLong("max-tokens"), help: "Default most tokens to generate.")
    var maxTokens: Int?

    @Option(help: "Default sampling temperature (0 is greedy).")
    var temperature: Double?

    @Option(name: .customLong("top-p"), help: "Default nucleus sampling mass.")
    var topP: Double?

    @Option(name: .customLong("top-k"), help: "Default top-k (0 = off).")
    var topK: Int?

    @Option(help: "Default random seed.")
    var seed: UInt64?

    @Option(help: "Default stop string (repeatable).")
    var stop: [String] = []

    @Option(help: "Default sparsification: dynamic, full, fastv or random.")
    var sparsity: String?

    @Option(name: .customLong("vision-keep-rate"), help: "Default fraction of image tokens kept.")
    var visionKeepRate: Double?

    @Option(help: "Priority for lines without one; lower runs first.")
    var priority: Int = 0

    @Option(name: .customLong("max-attempts"), help: "Tries before a job that keeps failing is marked failed.")
    var maxAttempts: Int = 3

    @Flag(help: "Print the report as one JSON object.")
    var json = false

    func validate() throws {
        let sources = [folder, jsonl, csv].compactMap { $0 }
        guard sources.count == 1 else { throw ValidationError("give exactly one of --folder, --jsonl and --csv") }
        if folder != nil && prompt == nil { throw ValidationError("--folder needs --prompt") }
        if folder == nil && prompt != nil { throw ValidationError("--prompt goes with --folder (manifests carry their prompts)") }
        if folder == nil && recursive { throw ValidationError("--recursive goes with --folder") }
        if let sparsity, JobParameters.Sparsity(rawValue: sparsity) == nil {
            throw ValidationError("--sparsity must be one of dynamic, full, fastv, random")
        }
        if let problem = defaults.problem() { throw ValidationError(problem.replacingOccurrences(of: "_", with: "-")) }
        guard maxAttempts >= 1 else { throw ValidationError("--max-attempts must be at least 1") }
    }

    var defaults: JobParameters {
        JobParameters(maxTokens: maxTokens, temperature: temperature, topP: topP, topK: topK, seed: seed,
                      stop: stop.isEmpty ? nil : stop, sparsity: sparsity.flatMap(JobParameters.Sparsity.init(rawValue:)),
                      visionKeepRate: visionKeepRate)
    }

    struct Report: Encodable {
        let source: String
        let inserted: Int
        let already_present: Int
        let bad_lines: [String]
    }

    func run() throws {
        try runQueueCommand(self, database: database.path) {
            let queue = try database.open()
            let options = ManifestOptions(defaults: defaults, priority: priority, maxAttempts: maxAttempts)
            let report: ManifestReport
            let source: String
            let onProblem: (ManifestProblem) -> Void = { writeStandardError($0.description) }
            if let folder {
                source = folder
                report = try queue.enqueueFolder(URL(fileURLWithPath: folder), prompt: prompt ?? "", recursive: recursive,
                                                 options: options, onProblem: onProblem)
            } else if let jsonl {
                source = jsonl
                report = try queue.enqueueJSONL(URL(fileURLWithPath: jsonl), options: options, onProblem: onProblem)
            } else {
                source = csv ?? ""
                report = try queue.enqueueCSV(URL(fileURLWithPath: source), options: options, onProblem: onProblem)
            }
            if json {
                try printJSON(Report(source: source, inserted: report.inserted, already_present: report.alreadyPresent,
                                     bad_lines: report.problems.map(\.description)))
            } else {
                var line = "enqueued \(report.inserted) job\(report.inserted == 1 ? "" : "s") from \(source)"
                if report.alreadyPresent > 0 { line += " (\(report.alreadyPresent) already queued)" }
                print(line)
            }
            if !report.problems.isEmpty {
                let count = report.problems.count
                let noun = folder == nil ? (count == 1 ? "line" : "lines") : (count == 1 ? "entry" : "entries")
                throw CommandFailure(message: "\(source): \(count) bad \(noun) skipped (see above)", code: 65)
            }
        }
    }
}

// MARK: status

struct StatusCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status", abstract: "Jobs per state, throughput and the time left.",
        discussion: "Throughput counts jobs that succeeded within --window, over the part of it in which they ran.")

    @OptionGroup var database: DatabaseOptions

    @Option(help: "How far back throughput looks (e.g. 1h, 30m, 1d).")
    var window = "1h"

    @Flag(help: "Print one JSON object.")
    var json = false

    func validate() throws {
        guard let window = DurationText.milliseconds(window), window > 0 else {
            throw ValidationError("--window must be a duration such as 1h, 30m or 1d")
        }
    }

    struct Report: Encodable {
        let database: String
        let queue_id: String
        let counts: [String: Int]
        let total: Int
        let remaining: Int
        let window_ms: Int64
        let succeeded_in_window: Int
        let jobs_per_hour: Double?
        let eta_ms: Int64?
        let orphaned: [Orphan]

        /// Unknown figures are written as null rather than left out, so readers find every key.
        func encode(to encoder: Encoder) throws {
            enum Key: String, CodingKey {
                case database, queue_id, counts, total, remaining, window_ms, succeeded_in_window, jobs_per_hour, eta_ms, orphaned
            }
            var container = encoder.container(keyedBy: Key.self)
            try container.encode(database, forKey: .database)
            try container.encode(queue_id, forKey: .queue_id)
            try container.encode(counts, forKey: .counts)
            try container.encode(total, forKey: .total)
            try container.encode(remaining, forKey: .remaining)
            try container.encode(window_ms, forKey: .window_ms)
            try container.encode(succeeded_in_window, forKey: .succeeded_in_window)
            try container.encode(jobs_per_hour, forKey: .jobs_per_hour)
            try container.encode(eta_ms, forKey: .eta_ms)
            try container.encode(orphaned, forKey: .orphaned)
        }
    }

    /// A running job whose worker is gone, as `status --json` reports it.
    struct Orphan: Encodable {
        let id: Int64
        let owner: String
        let host: String
        /// Why the worker is taken for gone.
        let reason: String
        /// When its lease expires: the latest it becomes claimable (a run on a dead worker's host reclaims it at once).
        let lease_expires_at: Int64
    }

    func run() throws {
        try runQueueCommand(self, database: database.path) {
            let queue = try database.open(readOnly: true)
            let orphans = try queue.orphanedJobs()
            let statistics = try queue.statistics(window: DurationText.milliseconds(window)!)
            let total = statistics.counts.values.reduce(0, +)
            if json {
                try printJSON(Report(database: database.path, queue_id: queue.identity,
                                     counts: Dictionary(uniqueKeysWithValues: statistics.counts.map { ($0.key.rawValue, $0.value) }),
                                     total: total, remaining: statistics.remaining, window_ms: statistics.windowMs,
                                     succeeded_in_window: statistics.succeededInWindow, jobs_per_hour: statistics.jobsPerHour,
                                     eta_ms: statistics.etaMs,
                                     orphaned: orphans.map { Orphan(id: $0.id, owner: $0.owner, host: $0.host, reason: orphanReason($0),
                                                                    lease_expires_at: $0.leaseExpiresAt) }))
                return
            }
            print("\(database.path) (queue \(queue.identity))")
            for state in JobState.allCases {
                print("  \(state.rawValue.padding(toLength: 10, withPad: " ", startingAt: 0)) \(statistics.counts[state, default: 0])")
            }
            print("  \("total".padding(toLength: 10, withPad: " ", startingAt: 0)) \(total)")
            if let perHour = statistics.jobsPerHour {
                print("throughput \(String(format: "%.1f", perHour)) jobs/h (\(statistics.succeededInWindow) in the last \(window))")
            } else {
                print("throughput none in the last \(window)")
            }
            let eta = statistics.etaMs.map { DurationText.describe(milliseconds: $0) } ?? "unknown"
            print("remaining  \(statistics.remaining), eta \(eta)")
            if !orphans.isEmpty {
                print("orphaned   \(orphans.count) running job\(orphans.count == 1 ? "" : "s") whose worker is gone:")
                for orphan in orphans { print("  job \(orphan.id): \(orphanNote(orphan))") }
            }
        }
    }
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

// MARK: list, show

struct ListCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "list", abstract: "List jobs by id.")

    @OptionGroup var database: DatabaseOptions

    @Option(help: "Only jobs in this state (repeatable).")
    var state: [JobState] = []

    @Option(name: .customLong("custom-id"), help: "Only the job with this custom_id (repeatable).")
    var customIDs: [String] = []

    @Option(help: "At most this many jobs.")
    var limit = 100

    @Option(help: "Start after this job id (for paging).")
    var after: Int64 = 0

    @Flag(help: "One JSON object per line.")
    var json = false

    func validate() throws {
        guard limit >= 1 else { throw ValidationError("--limit must be at least 1") }
    }

    func run() throws {
        try runQueueCommand(self, database: database.path) {
            let filter = JobFilter(customIDs: customIDs.isEmpty ? nil : customIDs, states: state.isEmpty ? nil : Set(state))
            let queue = try database.open(readOnly: true)
            let jobs = try queue.list(filter, limit: limit, afterID: after)
            let orphans = Dictionary(try queue.orphanedJobs().map { ($0.id, $0) }) { first, _ in first }
            if json {
                for job in jobs { try printJSON(job) }
                return
            }
            print(["ID", "STATE", "ATTEMPT", "PRIORITY", "CUSTOM_ID", "IMAGE", "ERROR"].joined(separator: "\t"))
            for job in jobs {
                print(["\(job.id)", job.state.rawValue + (job.cancelRequested ? "*" : ""), "\(job.attempt)/\(job.maxAttempts)",
                       "\(job.priority)", job.customID ?? "-", job.imagePath,
                       orphans[job.id].map(orphanNote) ?? job.error.map { String($0.prefix(80)) } ?? ""]
                    .joined(separator: "\t"))
            }
        }
    }
}

struct ShowCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "show", abstract: "Show every field of jobs.")

    @OptionGroup var database: DatabaseOptions

    @Argument(help: "Job ids.")
    var ids: [Int64] = []

    @Option(name: .customLong("custom-id"), help: "A job's custom_id (repeatable).")
    var customIDs: [String] = []

    @Flag(help: "One JSON object per line.")
    var json = false

    func validate() throws {
        guard !ids.isEmpty || !customIDs.isEmpty else { throw ValidationError("give job ids or --custom-id") }
    }

    func run() throws {
        try runQueueCommand(self, database: database.path) {
            let queue = try database.open(readOnly: true)
            var jobs: [Job] = []
            for id in ids {
                guard let job = try queue.job(id: id) else { throw CommandFailure(message: "no job \(id) in \(database.path)", code: 65) }
                jobs.append(job)
            }
            for customID in customIDs {
                guard let job = try queue.job(customID: customID) else {
                    throw CommandFailure(message: "no job with custom_id '\(customID)' in \(database.path)", code: 65)
                }
                jobs.append(job)
            }
            for (index, job) in jobs.enumerated() {
                if json { try printJSON(job); continue }
                if index > 0 { print("") }
                let encoder = JSONEncoder()
                encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
                let fields: [(String, String?)] = [
                    ("id", "\(job.id)"), ("custom_id", job.customID), ("state", job.state.rawValue),
                    ("attempt", "\(job.attempt) of \(job.maxAttempts)"), ("priority", "\(job.priority)"),
                    ("image", job.imagePath), ("image_sha256", job.imageSHA256), ("prompt", job.prompt),
                    ("params", job.parameters.canonicalJSON()), ("run_at", timestamp(job.runAt)),
                    ("lease_owner", job.leaseOwner), ("lease_expires_at", job.leaseExpiresAt.map(timestamp)),
                    ("heartbeat_at", job.heartbeatAt.map(timestamp)), ("cancel_requested", job.cancelRequested ? "yes" : nil),
                    ("error", job.error), ("output", job.outputPath), ("output_sha256", job.outputSHA256),
                    ("timings", try job.timings.map { String(decoding: try encoder.encode($0), as: UTF8.self) }),
                    ("created_at", timestamp(job.createdAt)), ("updated_at", timestamp(job.updatedAt)),
                    ("started_at", job.startedAt.map(timestamp)), ("finalized_at", job.finalizedAt.map(timestamp)),
                ]
                for case let (name, value?) in fields {
                    print("\(name.padding(toLength: 16, withPad: " ", startingAt: 0)) \(value)")
                }
            }
        }
    }
}

/// Unix milliseconds as ISO 8601 UTC with milliseconds.
func timestamp(_ milliseconds: Int64) -> String {
    let formatter = ISO8601DateFormatter()
    formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
    return formatter.string(from: Date(timeIntervalSince1970: Double(milliseconds) / 1000))
}

// MARK: retry, cancel

struct RetryCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "retry", abstract: "Put failed or cancelled jobs back in the queue.",
        discussion: """
        Selects by ids, --custom-id and --state (all given conditions must hold); jobs in other states than failed and \
        cancelled are left alone. Each requeued job gets --attempts fresh tries: its attempt counter keeps counting \
        (it fences late results) and max_attempts becomes attempt + N.
        """)

    @OptionGroup var database: DatabaseOptions
    @OptionGroup var selection: SelectionOptions

    @Option(help: "Fresh tries each requeued job gets.")
    var attempts = 3

    func validate() throws {
        guard !selection.filter.isEmpty else { throw ValidationError("select jobs: give ids, --custom-id or --state") }
        guard attempts >= 1 else { throw ValidationError("--attempts must be at least 1") }
    }

    func run() throws {
        try runQueueCommand(self, database: database.path) {
            let count = try database.open().retry(selection.filter, attempts: attempts)
            print("requeued \(count) job\(count == 1 ? "" : "s")")
        }
    }
}

struct CancelCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cancel", abstract: "Cancel queued jobs, and ask running ones to stop.",
        discussion: """
        Selects by ids, --custom-id and --state (all given conditions must hold), or --all. Queued jobs (available, \
        retryable) are cancelled at once; a running job leaves its batch at the daemon's next decode step.
        """)

    @OptionGroup var database: DatabaseOptions
    @OptionGroup var selection: SelectionOptions

    @Flag(help: "Cancel every unfinished job.")
    var all = false

    func validate() throws {
        // Exactly one of: a selection, or --all.
        guard selection.filter.isEmpty == all else {
            throw ValidationError(all ? "--all cannot be combined with other selections" : "select jobs: give ids, --custom-id, --state or --all")
        }
    }

    func run() throws {
        try runQueueCommand(self, database: database.path) {
            let result = try database.open().cancel(all ? .all : selection.filter)
            print("cancelled \(result.cancelled) queued job\(result.cancelled == 1 ? "" : "s"); "
                  + "asked \(result.requested) running job\(result.requested == 1 ? "" : "s") to stop")
        }
    }
}

// MARK: export

struct ExportCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "export", abstract: "Write one record per job: custom_id, state, attempts, and text or error.",
        discussion: """
        Records carry job_id, custom_id, image, state, attempts, finish_reason, text (read from the job's result \
        file, checked against its recorded sha256) and error. JSONL leaves out absent fields; CSV has a header row and \
        empty cells for them. The output file is written atomically. A result file that cannot be read is reported on \
        stderr, its record carries the error, and the exit status is 65. An --output that is the queue database or its \
        -wal or -shm file (by device and inode, so links count), or an existing file that is not a regular file (a \
        directory, FIFO or device), is refused with exit status 64 before anything is written.
        """)

    enum Format: String, ExpressibleByArgument, CaseIterable { case jsonl, csv }

    @OptionGroup var database: DatabaseOptions

    @Option(help: "jsonl or csv (default: from the --output extension, else jsonl).")
    var format: Format?

    @Option(help: "Only jobs in this state (repeatable), e.g. succeeded or failed.")
    var state: [JobState] = []

    @Option(help: "The file to write, or - for standard output.")
    var output: String

    struct Record: Encodable {
        let job_id: Int64
        let custom_id: String?
        let image: String
        let state: String
        let attempts: Int
        let finish_reason: String?
        let text: String?
        let error: String?
    }

    var resolvedFormat: Format { format ?? (output.lowercased().hasSuffix(".csv") ? .csv : .jsonl) }

    /// Refuses an output that would destroy the queue (the database or its -wal or -shm, by device and inode: a
    /// link or another spelling of the path is the same file) or that is not a regular file; renaming the export
    /// over any of these would replace it.
    static func checkOutput(_ output: String, database: String) throws {
        var target = stat()
        guard stat(output, &target) == 0 else { return }  // nothing there yet (or a dangling link, replaced as a name)
        for suffix in ["", "-wal", "-shm", "-journal"] {
            var file = stat()
            if stat(database + suffix, &file) == 0 && file.st_dev == target.st_dev && file.st_ino == target.st_ino {
                throw CommandFailure(message: "--output \(output) is the queue database\(suffix.isEmpty ? "" : "'s \(suffix) file") \(database + suffix); "
                                     + "export to another file", code: 64)
            }
        }
        guard target.st_mode & S_IFMT == S_IFREG else {
            throw CommandFailure(message: "--output \(output) exists and is not a regular file; export to a regular file or to -", code: 64)
        }
    }

    func run() throws {
        try runQueueCommand(self, database: database.path) {
            if output != "-" { try Self.checkOutput(output, database: database.path) }
            let queue = try database.open(readOnly: true)
            let filter = JobFilter(states: state.isEmpty ? nil : Set(state))
            var unreadable = 0
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
            func records(_ emit: (String) throws -> Void) throws {
                func emitRecord(_ job: Job, text: String?, finishReason: String?, error: String?) throws {
                    let record = Record(job_id: job.id, custom_id: job.customID, image: job.imagePath, state: job.state.rawValue,
                                        attempts: job.attempt, finish_reason: finishReason, text: text, error: error)
                    if resolvedFormat == .jsonl {
                        try emit(String(decoding: try encoder.encode(record), as: UTF8.self) + "\n")
                    } else {
                        try emit([record.custom_id, "\(record.job_id)", record.state, "\(record.attempts)", record.image,
                                  record.finish_reason, record.text, record.error].map { csvField($0 ?? "") }.joined(separator: ",") + "\r\n")
                    }
                }
                if resolvedFormat == .csv {
                    try emit(["custom_id", "job_id", "state", "attempts", "image", "finish_reason", "text", "error"].joined(separator: ",") + "\r\n")
                }
                try queue.forEach(filter) { job in
                    guard job.state == .succeeded else {
                        return try emitRecord(job, text: nil, finishReason: nil, error: job.error)
                    }
                    do {
                        guard let path = job.outputPath else { throw ArtifactError.malformedResult(path: "-", reason: "no result file recorded") }
                        let summary = try ResultFile.read(ResultSummary.self, from: URL(fileURLWithPath: path),
                                                          expectedSHA256: job.outputSHA256)
                        try emitRecord(job, text: summary.text, finishReason: summary.finishReason, error: nil)
                    } catch let error as ArtifactError {
                        unreadable += 1
                        let message = "job \(job.id): \(error)"
                        writeStandardError(message)
                        try emitRecord(job, text: nil, finishReason: nil, error: message)
                    }
                }
            }
            if output == "-" {
                try records { FileHandle.standardOutput.write(Data($0.utf8)) }
            } else {
                try AtomicFile.write(to: URL(fileURLWithPath: output)) { writer in
                    try records { try writer.write($0) }
                }
            }
            if unreadable > 0 {
                throw CommandFailure(message: "\(unreadable) result file\(unreadable == 1 ? "" : "s") could not be read (see above); their records carry the error", code: 65)
            }
        }
    }
}

/// RFC 4180: quote a field holding a comma, quote, CR or LF, doubling its quotes.
func csvField(_ text: String) -> String {
    guard text.contains(where: { $0 == "," || $0 == "\"" || $0 == "\n" || $0 == "\r" }) else { return text }
    return "\"" + text.replacingOccurrences(of: "\"", with: "\"\"") + "\""
}

// MARK: prune

struct PruneCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "prune", abstract: "Delete finished jobs (succeeded, failed, cancelled) older than a duration.")

    @OptionGroup var database: DatabaseOptions

    @Option(name: .customLong("older-than"), help: "Age since the job finished, e.g. 7d, 12h, 30m.")
    var olderThan: String

    @Flag(name: .customLong("delete-outputs"), help: "Also delete the result files and KV snapshots of the pruned jobs.")
    var deleteOutputs = false

    func validate() throws {
        guard DurationText.milliseconds(olderThan) != nil else {
            throw ValidationError("--older-than must be a duration such as 7d, 12h or 30m")
        }
    }

    func run() throws {
        try runQueueCommand(self, database: database.path) {
            let pruned = try database.open().prune(olderThan: DurationText.milliseconds(olderThan)!)
            let deleted = pruned.deleted
            var results = 0, snapshots = 0
            if deleteOutputs {
                for path in pruned.outputPaths where (try? FileManager.default.removeItem(atPath: path)) != nil { results += 1 }
                for path in pruned.snapshotPaths where (try? FileManager.default.removeItem(atPath: path)) != nil { snapshots += 1 }
            }
            print("deleted \(deleted) finished job\(deleted == 1 ? "" : "s") older than \(olderThan)"
                  + (deleteOutputs ? " and \(results) result file\(results == 1 ? "" : "s")" : "")
                  + (snapshots > 0 ? " and \(snapshots) snapshot\(snapshots == 1 ? "" : "s")" : ""))
        }
    }
}
