// The daemon loop (docs/FORMATS.md "Queue semantics"): claim a batch in one short transaction,
// keep its leases alive from a heartbeat thread while the engine runs, write each result file
// atomically, then complete (fenced by attempt and owner) or fail each job. Between decode steps
// the engine asks a `BatchSession` what to do: write KV snapshots, let a cancelled job leave the
// batch, or stop every row for a graceful shutdown. It never imports the model: the engine
// reaches it through `BatchRunner`, which the `dllava` executable implements, and snapshots cross
// as opaque payloads.
import Artifacts
import Foundation
import JobQueue

/// What the engine made of one job.
public enum JobOutcome<Stats: Codable & Sendable>: Sendable {
    case succeeded(text: String, tokenIDs: [Int32], finishReason: String, stats: Stats, timings: JobTimings)
    /// `permanent`: the job can never succeed (an undecodable image, a prompt longer than the
    /// context); otherwise it is retried with backoff.
    case failed(reason: String, permanent: Bool)
    /// The job left its batch unfinished because `BatchSession.afterStep` removed it (a cancel, or
    /// a graceful shutdown after its snapshot).
    case stopped
}

/// Runs batches of jobs through an engine.
public protocol BatchRunner: Sendable {
    associatedtype Stats: Codable & Sendable
    /// Identifies the model in result and snapshot files.
    var fingerprint: ModelFingerprint { get }
    /// One outcome per job, in order. A job's outcome must not depend on its batch-mates.
    /// `images[i]` is job `i`'s image file, read once and checked against the sha256 recorded at
    /// enqueue: the engine decodes these bytes, never the path again (the file may change).
    /// `snapshots[i]` is job `i`'s latest snapshot payload (checked against the model and its
    /// checksum): the job goes on from it, or, when the engine cannot use it, starts from scratch
    /// and says so through `session.log`. The runner calls `session.afterStep` after prefill and
    /// after every decode step, and hands the payloads it asks for to `session.snapshotTaken`.
    func run(_ jobs: [Job], images: [Data], resumingFrom snapshots: [Data?], session: BatchSession) -> [JobOutcome<Stats>]
}

/// Where a running batch stands: after prefill (`step` 0) and after every decode step. Jobs are
/// indices into the batch.
public struct BatchStep: Sendable, Equatable {
    public var step: Int
    public var generating: [Int]
    /// Jobs that finished generating in this step.
    public var finished: [Int]
    public var newTokens: Int

    public init(step: Int, generating: [Int], finished: [Int], newTokens: Int) {
        self.step = step
        self.generating = generating
        self.finished = finished
        self.newTokens = newTokens
    }
}

/// What the daemon wants done before the next decode step (job indices into the batch).
public struct BatchDirective: Sendable, Equatable {
    /// Capture these jobs' state and pass it to `snapshotTaken`.
    public var snapshot: Set<Int> = []
    /// These jobs leave the batch now (outcome `.stopped`); the others go on unchanged.
    public var remove: Set<Int> = []
}

public struct DaemonOptions: Sendable {
    /// Heartbeats in one lease: more than three, so a lease survives a missed heartbeat or two.
    public static let heartbeatsPerLease: Int64 = 4
    /// The shortest lease a worker accepts: shorter ones expire under a healthy worker whenever a
    /// heartbeat's write waits on another process (a busy database, an fsync), and the job is
    /// then taken from it.
    public static let minimumLeaseMilliseconds: Int64 = 2_000

    public var batchSize = 8
    /// Lease length; the heartbeat renews it every `heartbeatsPerLease`-th of it, so one late or
    /// failed heartbeat never loses a healthy worker its jobs. At least `minimumLeaseMilliseconds`.
    public var leaseMilliseconds: Int64 = 5 * 60_000
    /// Stop when nothing is claimable (rather than polling for new work).
    public var untilEmpty = false
    public var maxJobs: Int? = nil
    public var maxSeconds: Double? = nil
    /// The longest an idle worker waits between claims (SQLite: the poll interval; PostgreSQL wakes it sooner on
    /// LISTEN/NOTIFY).
    public var pollSeconds: Double = 2
    public var owner = "\(ProcessInfo.processInfo.hostName)-\(getpid())-\(UUID().uuidString.prefix(8))"
    /// A KV snapshot of every running job each this many decode steps (0: none; a graceful
    /// shutdown writes them anyway).
    public var snapshotEvery = 32
    /// Keep each job's final snapshot (taken when it finishes) instead of deleting its snapshot.
    public var keepKV = false

    public init() {}
}

/// Faults the daemon names itself (the others are the queue's or the file system's errors).
public enum DaemonFault: Error, Sendable, CustomStringConvertible {
    /// A job's result file could not be written (a full disk, a read-only or vanished `--out`).
    case resultUnwritable(job: Int64, path: String, reason: String)

    public var description: String {
        switch self {
        case let .resultUnwritable(job, path, reason): "cannot write the result of job \(job) to \(path): \(reason)"
        }
    }
}

/// A run stopped by a fault: what it did until then, the cause, and what became of its batch.
public struct DaemonStopped: Error {
    public var report: DaemonReport
    public var underlying: Error
    /// Jobs of the batch handed back to the queue without counting their attempt.
    public var released: Int
    /// Jobs of the batch the database would not take back: they stay `running` until their lease
    /// expires (then the attempt counts).
    public var unreleased: Int

    /// What happened to the batch, as a clause to follow the cause.
    public var batchNote: String {
        var note = "released \(released) job\(released == 1 ? "" : "s") of the batch to the queue without counting the attempt"
        if unreleased > 0 { note += "; \(unreleased) stay running until their lease expires" }
        return note
    }
}

/// Counts of one daemon run.
public struct DaemonReport: Sendable, Equatable {
    public var claimed = 0
    public var succeeded = 0
    public var failed = 0
    public var retried = 0
    /// Results the queue refused (the lease had been lost to another worker).
    public var discarded = 0
    /// Running jobs finalised as cancelled at a decode step.
    public var cancelled = 0
    /// Jobs handed back to the queue by a graceful shutdown.
    public var released = 0
    public var generatedTokens = 0
}

/// Figures for a progress display.
public struct DaemonProgress: Sendable, Equatable {
    /// Jobs this run finished (succeeded, failed, cancelled or released).
    public var done: Int
    /// Jobs left in the queue (available, retryable, running), this run's included.
    public var remaining: Int
    /// Tokens this run generated.
    public var generatedTokens: Int
    public var elapsedSeconds: Double

    public var tokensPerSecond: Double { elapsedSeconds > 0 ? Double(generatedTokens) / elapsedSeconds : 0 }
    /// Seconds to finish `remaining` at this run's pace; nil before the first job is done.
    public var etaSeconds: Double? { done > 0 ? elapsedSeconds / Double(done) * Double(remaining) : nil }
}

/// Jobs of the running batch whose lease the heartbeat found lost (rescued by another worker,
/// or finalised): written by the heartbeat thread, read at every decode step.
final class LostLeases: @unchecked Sendable {
    private let lock = NSLock()
    private var lost: Set<Int64> = []

    func insert(_ ids: Set<Int64>) { lock.withLock { lost.formUnion(ids) } }
    var ids: Set<Int64> { lock.withLock { lost } }
}

/// A flag set from a signal handler or another thread; read between batches and at every decode step.
public final class StopFlag: @unchecked Sendable {
    private let lock = NSLock()
    private var stopped = false

    public init() {}

    public func stop() { lock.withLock { stopped = true } }
    public var isStopped: Bool { lock.withLock { stopped } }
}

public struct BatchDaemon<Runner: BatchRunner>: Sendable {
    public let queue: JobQueue
    public let runner: Runner
    public let results: ResultFile
    public let options: DaemonOptions

    /// Files go under `<out>/<queue identity>/`: results `<job id>-<attempt>.json.zst`, snapshots
    /// `snapshots/job-<job id>.kv.zst`. Job ids are never reused within a queue and the identity is a UUID, so
    /// neither a later job nor another queue sharing `out` can write or read these names.
    public init(queue: JobQueue, runner: Runner, out: URL, options: DaemonOptions) throws {
        self.queue = queue
        self.runner = runner
        self.results = try ResultFile(directory: Self.queueDirectory(out: out, queue: queue.identity))
        self.options = options
    }

    /// `<out>/<queue identity>`: where one queue's result and snapshot files live.
    public static func queueDirectory(out: URL, queue identity: String) -> URL { out.appendingPathComponent(identity) }

    public var snapshotDirectory: URL { results.directory.appendingPathComponent("snapshots") }

    public func snapshotURL(job: Int64) -> URL { snapshotDirectory.appendingPathComponent("job-\(job).kv.zst") }

    /// What a snapshot of `job` must carry to be resumed by it.
    func snapshotIdentity(_ job: Job) -> SnapshotIdentity {
        SnapshotIdentity(model: runner.fingerprint.fingerprint, queue: queue.identity, job: job.id, imageSHA256: job.imageSHA256,
                         prompt: job.prompt, parameters: job.parameters.canonicalJSON())
    }

    /// Runs until the queue is empty (`untilEmpty`), `maxJobs` or `maxSeconds` is reached, or
    /// `stop` is set. Graceful shutdown: once `stop` is set nothing new is claimed, and at the next
    /// decode step every running job is snapshotted, leaves its batch and is released to the queue.
    /// `log` receives one line per batch and per notable event; `progress` is called after every
    /// decode step and batch.
    ///
    /// At start it sweeps what earlier runs left behind (`sweep`). A fault that makes going on
    /// pointless (a result file that cannot be written, as on a full disk; a database write that
    /// fails) stops the run: the batch's unsettled jobs are released to the queue without counting
    /// their attempt (as far as the database still takes writes) and `DaemonStopped` is thrown with
    /// the report so far and the cause.
    public func run(stop: StopFlag, log: @escaping @Sendable (String) -> Void,
                    progress: @escaping @Sendable (DaemonProgress) -> Void = { _ in }) throws -> DaemonReport {
        var report = DaemonReport()
        let start = Date()
        do {
            try FileManager.default.createDirectory(at: snapshotDirectory, withIntermediateDirectories: true)
        } catch {
            throw ArtifactError.io(path: snapshotDirectory.path, operation: "create directory", reason: error.localizedDescription)
        }
        do {
            try sweep(log: log)
            try queue.register(WorkerRecord.current(owner: options.owner, leaseMilliseconds: options.leaseMilliseconds,
                                                    now: Int64(Date().timeIntervalSince1970 * 1000)))
        } catch {
            throw DaemonStopped(report: report, underlying: error, released: 0, unreleased: 0)
        }
        defer {
            do { try queue.unregister(owner: options.owner) } catch { log("cannot remove this worker's record: \(error)") }
        }
        var waitingReported = false
        while !stop.isStopped {
            if let maxSeconds = options.maxSeconds, Date().timeIntervalSince(start) >= maxSeconds { break }
            var limit = options.batchSize
            if let maxJobs = options.maxJobs {
                limit = min(limit, maxJobs - report.claimed)
                if limit <= 0 { break }
            }
            let claimed: [Job]
            var orphans: [OrphanedJob] = []
            do {
                let reclaimed = try queue.reclaimJobsOfDeadWorkers()
                if reclaimed > 0 { log("reclaimed \(reclaimed) job\(reclaimed == 1 ? "" : "s") of dead workers on this host") }
                claimed = try queue.claim(owner: options.owner, limit: limit, leaseDuration: options.leaseMilliseconds)
                if claimed.isEmpty && options.untilEmpty { orphans = try queue.orphanedJobs() }
            } catch {
                throw DaemonStopped(report: report, underlying: error, released: 0, unreleased: 0)
            }
            if claimed.isEmpty {
                if options.untilEmpty && orphans.isEmpty { break }
                if !orphans.isEmpty && !waitingReported {
                    // Silent workers on other hosts: their jobs become claimable when their leases expire.
                    let until = orphans.map(\.leaseExpiresAt).max() ?? 0
                    log("waiting for \(orphans.count) job\(orphans.count == 1 ? "" : "s") of silent workers (\(Set(orphans.map(\.owner)).sorted().joined(separator: ", "))); "
                        + "their leases expire by \(Date(timeIntervalSince1970: Double(until) / 1000))")
                    waitingReported = true
                }
                queue.waitForWork(upTo: options.pollSeconds)
                continue
            }
            waitingReported = false
            report.claimed += claimed.count
            // Jobs of this batch not yet finished, failed, cancelled or released: what a fault hands back.
            var unsettled = claimed.map(\.id)
            do {
                try runBatch(claimed, unsettled: &unsettled, report: &report, stop: stop, start: start, log: log, progress: progress)
            } catch {
                var released = 0
                if !unsettled.isEmpty {
                    do {
                        released = try queue.release(jobs: unsettled, owner: options.owner)
                        report.released += released
                    } catch {
                        log("cannot release jobs \(unsettled.map(String.init).joined(separator: ", ")): \(error); they are rescued when their lease expires")
                    }
                }
                throw DaemonStopped(report: report, underlying: error, released: released, unreleased: unsettled.count - released)
            }
        }
        return report
    }

    /// One claimed batch: image checks, the engine, then each job's result, failure, cancel or
    /// release. Removes each job from `unsettled` once the queue has recorded what became of it.
    func runBatch(_ claimed: [Job], unsettled: inout [Int64], report: inout DaemonReport, stop: StopFlag, start: Date,
                  log: @escaping @Sendable (String) -> Void, progress: @escaping @Sendable (DaemonProgress) -> Void) throws {
        let batchStart = Date()
        let checked = try readImages(claimed, report: &report, log: log)
        let jobs = checked.map(\.job), images = checked.map(\.image)
        unsettled = jobs.map(\.id)
        if jobs.isEmpty { return }
        let counts = try queue.counts()
        let lostLeases = LostLeases()
        let session = BatchSession(jobs: jobs, queue: queue, options: options, stop: stop, lostLeases: lostLeases, snapshotURL: snapshotURL,
                                   identity: snapshotIdentity, log: log, progress: progress,
                                   start: start, done: report.succeeded + report.failed + report.cancelled + report.released,
                                   remaining: (counts[.available] ?? 0) + (counts[.retryable] ?? 0) + (counts[.running] ?? 0),
                                   generatedTokens: report.generatedTokens)
        let snapshots = jobs.map { readSnapshot($0, log: log) }
        let outcomes = withHeartbeat(jobs, lostLeases: lostLeases) { runner.run(jobs, images: images, resumingFrom: snapshots, session: session) }
        var released: [Int64] = []
        for (index, (job, outcome)) in zip(jobs, outcomes).enumerated() {
            if case .stopped = outcome {
                if let id = try settleStopped(job, index: index, session: session, report: &report, log: log) {
                    released.append(id)
                    continue
                }
            } else {
                try finish(job, outcome, report: &report, log: log)
            }
            unsettled.removeAll { $0 == job.id }
        }
        if !released.isEmpty {
            report.released += try queue.release(jobs: released, owner: options.owner)
            unsettled.removeAll { released.contains($0) }
            log("released jobs \(released.map(String.init).joined(separator: ", ")) to the queue; their snapshots are in \(snapshotDirectory.path)")
        }
        let seconds = Date().timeIntervalSince(batchStart)
        let after = try queue.counts()
        let remaining = (after[.available] ?? 0) + (after[.retryable] ?? 0) + (after[.running] ?? 0)
        log(String(format: "batch of %d in %.1f s: %d succeeded, %d failed so far; %d tokens generated; %d left in the queue",
                   jobs.count, seconds, report.succeeded, report.failed, report.generatedTokens, remaining))
        progress(DaemonProgress(done: report.succeeded + report.failed + report.cancelled + report.released, remaining: remaining,
                                generatedTokens: report.generatedTokens, elapsedSeconds: Date().timeIntervalSince(start)))
    }

    /// Temporary files older than this are left by a killed writer: an atomic write of one result
    /// or snapshot never takes so long.
    public static var staleTemporaryAge: TimeInterval { 600 }

    /// Removes what earlier runs of this queue left in its folder: temporary files (`.<name>.tmp-*`)
    /// of writers killed mid-write, older than `staleTemporaryAge`, and result files that no job
    /// row records and never will: those whose job has moved past that attempt (a completion the
    /// database refused or failed to record). A result file whose job is gone (pruned without
    /// `--delete-outputs`) is the operator's and stays; one whose attempt may still complete is
    /// left to its worker.
    public func sweep(log: (String) -> Void) throws {
        let now = Date()
        for directory in [results.directory, snapshotDirectory] {
            for name in (try? FileManager.default.contentsOfDirectory(atPath: directory.path)) ?? [] where name.hasPrefix(".") && name.contains(".tmp-") {
                let url = directory.appendingPathComponent(name)
                guard let modified = (try? url.resourceValues(forKeys: [.contentModificationDateKey]))?.contentModificationDate,
                      now.timeIntervalSince(modified) > Self.staleTemporaryAge else { continue }
                if unlink(url.path) == 0 { log("removed \(url.path), a temporary file an interrupted writer left") }
            }
        }
        var attempts: [Int64: [(attempt: Int, url: URL)]] = [:]
        for name in (try? FileManager.default.contentsOfDirectory(atPath: results.directory.path)) ?? [] {
            guard let (job, attempt) = ResultFile.parseName(name) else { continue }
            attempts[job, default: []].append((attempt, results.directory.appendingPathComponent(name)))
        }
        let ids = attempts.keys.sorted()
        var start = 0
        while start < ids.count {
            let chunk = Array(ids[start ..< min(start + 1_000, ids.count)])
            start += chunk.count
            for job in try queue.list(JobFilter(ids: chunk), limit: chunk.count) {
                for (attempt, url) in attempts[job.id] ?? [] where job.outputPath != url.path {
                    let mayStillComplete = job.state == .running && job.attempt == attempt
                    if mayStillComplete || attempt > job.attempt { continue }
                    if unlink(url.path) == 0 {
                        log("removed \(url.path): no job row records it (job \(job.id) is \(job.state.rawValue) at attempt \(job.attempt))")
                    }
                }
            }
        }
    }

    /// Settles a job that left its batch unfinished: dropped (lease lost), finalised as cancelled,
    /// or, after a graceful stop, returned for `release` (its id).
    func settleStopped(_ job: Job, index: Int, session: BatchSession, report: inout DaemonReport, log: (String) -> Void) throws -> Int64? {
        if session.abandoned.contains(index) {
            report.discarded += 1
            log("job \(job.id): its lease was lost (rescued by another worker, or finalised); dropped at a decode step")
        } else if session.cancelled.contains(index) {
            if try queue.acknowledgeCancel(job: job.id, attempt: job.attempt, owner: options.owner) {
                report.cancelled += 1
                removeSnapshot(job: job.id, log: log)
                log("job \(job.id): cancelled at a decode step")
            } else {
                report.discarded += 1
            }
        } else {
            return job.id
        }
        return nil
    }

    /// Reads each claimed job's image once and returns the jobs with their bytes; fails, permanently and with a
    /// sentence naming the file, each job whose image is no longer the one enqueued (its sha256 differs from the
    /// one recorded at enqueue) or cannot be read. Captioning whatever now lies at the path would give the job
    /// another image's caption; handing the engine the checked bytes leaves no moment for the file to change.
    func readImages(_ jobs: [Job], report: inout DaemonReport, log: (String) -> Void) throws -> [(job: Job, image: Data)] {
        var kept: [(job: Job, image: Data)] = []
        for job in jobs {
            let reason: String
            do {
                let image = try Self.readImage(job.imagePath)
                let actual = Checksum.sha256Hex(image)
                if actual == job.imageSHA256 {
                    kept.append((job, image))
                    continue
                }
                reason = "the image \(job.imagePath) changed after the job was enqueued (its sha256 is now \(actual), "
                    + "the job recorded \(job.imageSHA256)); enqueue it again to caption the new image"
            } catch {
                reason = "cannot read the image: \(error)"
            }
            log("job \(job.id): \(reason)")
            try finish(job, .failed(reason: reason, permanent: true), report: &report, log: log)
        }
        return kept
    }

    /// Images larger than this are refused (the engine's decoder refuses them too).
    public static var maxImageBytes: Int { 1 << 30 }

    /// The bytes of the regular file at `path`, opened without blocking (a FIFO named like an image never stalls
    /// the batch) and refused when it is not a regular file or larger than `maxImageBytes`.
    static func readImage(_ path: String) throws -> Data {
        let descriptor = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC)
        guard descriptor >= 0 else { throw ArtifactError.io(path: path, operation: "open", reason: String(cString: strerror(errno))) }
        let handle = FileHandle(fileDescriptor: descriptor, closeOnDealloc: true)
        var status = stat()
        guard fstat(descriptor, &status) == 0, status.st_mode & S_IFMT == S_IFREG else {
            throw ArtifactError.io(path: path, operation: "read", reason: "not a regular file")
        }
        guard Int(status.st_size) <= maxImageBytes else {
            throw ArtifactError.io(path: path, operation: "read", reason: "\(status.st_size) bytes, more than \(maxImageBytes)")
        }
        do {
            return try handle.readToEnd() ?? Data()
        } catch {
            throw ArtifactError.io(path: path, operation: "read", reason: error.localizedDescription)
        }
    }

    /// The payload of a job's latest snapshot, or nil when it has none or it is refused (logged;
    /// the job then starts from scratch): a snapshot is used only by the job, of this queue, that
    /// wrote it, with the same model contents, image, prompt and parameters. Reading changes
    /// nothing on disk.
    func readSnapshot(_ job: Job, log: (String) -> Void) -> Data? {
        let url = snapshotURL(job: job.id)
        guard FileManager.default.fileExists(atPath: url.path) else { return nil }
        do {
            return try SnapshotFile.read(from: url, expected: snapshotIdentity(job)).payload
        } catch {
            log("job \(job.id): \(error); starting it from scratch")
            return nil
        }
    }

    func removeSnapshot(job: Int64, log: (String) -> Void) {
        let url = snapshotURL(job: job)
        if unlink(url.path) != 0 && errno != ENOENT {
            log("job \(job): cannot delete its snapshot \(url.path): \(String(cString: strerror(errno)))")
        }
    }

    /// Writes the result and completes the job, or records its failure.
    /// A finished job's snapshot is deleted (kept with `keepKV` on success); a job that will be
    /// retried keeps it to resume from.
    func finish(_ job: Job, _ outcome: JobOutcome<Runner.Stats>, report: inout DaemonReport, log: (String) -> Void) throws {
        switch outcome {
        case .succeeded(let text, let tokenIDs, let finishReason, let stats, let timings):
            let now = Int64(Date().timeIntervalSince1970 * 1000)
            let record = ResultRecord(queueID: queue.identity, jobID: job.id, attempt: job.attempt, customID: job.customID, text: text, tokenIDs: tokenIDs,
                                      finishReason: finishReason, parameters: job.parameters, stats: stats, model: runner.fingerprint,
                                      timings: ResultTimings(enqueuedAt: job.createdAt, startedAt: job.startedAt ?? now, finishedAt: now))
            let written: AtomicFile.Written
            do {
                written = try results.write(record)
            } catch {
                throw DaemonFault.resultUnwritable(job: job.id, path: results.url(job: job.id, attempt: job.attempt).path, reason: "\(error)")
            }
            let completed: Bool
            do {
                completed = try queue.complete(job: job.id, attempt: job.attempt, owner: options.owner,
                                               output: JobOutput(path: written.url.path, sha256: written.sha256, timings: timings))
            } catch {
                // No row records the file: remove it rather than leave an orphan.
                unlink(written.url.path)
                throw error
            }
            if !completed { unlink(written.url.path) }
            if completed {
                report.succeeded += 1
                report.generatedTokens += tokenIDs.count
                if options.keepKV {
                    log("job \(job.id): final KV snapshot kept at \(snapshotURL(job: job.id).path)")
                } else {
                    removeSnapshot(job: job.id, log: log)
                }
            } else {
                report.discarded += 1
            }
        case .failed(let reason, let permanent):
            switch try queue.fail(job: job.id, attempt: job.attempt, owner: options.owner, error: reason, permanent: permanent) {
            case .failed?, .cancelled?:
                report.failed += 1
                removeSnapshot(job: job.id, log: log)
            case nil: report.discarded += 1
            default: report.retried += 1
            }
        case .stopped:
            preconditionFailure("stopped jobs are released or cancelled by run")
        }
    }

    /// Runs `body` while a thread renews the jobs' leases every quarter of the lease, so long
    /// matrix products never starve the heartbeat, and records the leases it finds lost.
    func withHeartbeat<T>(_ jobs: [Job], lostLeases: LostLeases, _ body: () -> T) -> T {
        let done = StopFlag()
        let ids = jobs.map(\.id)
        let queue = queue, owner = options.owner, lease = options.leaseMilliseconds
        let thread = Thread {
            let interval = Double(lease) / Double(DaemonOptions.heartbeatsPerLease) / 1000
            var next = Date().addingTimeInterval(interval)
            while !done.isStopped {
                Thread.sleep(forTimeInterval: min(0.2, interval))
                if Date() >= next {
                    if let result = try? queue.heartbeat(jobs: ids, owner: owner, leaseDuration: lease) { lostLeases.insert(result.lost) }
                    next = Date().addingTimeInterval(interval)
                }
            }
        }
        thread.start()
        defer { done.stop() }
        return body()
    }
}

/// The daemon's side of one running batch, consulted by the runner between decode steps: it
/// writes snapshots (every `snapshotEvery` steps, at a graceful shutdown, and finals with
/// `keepKV`), removes jobs whose cancel was requested or whose lease was lost, and reports
/// progress. Used from the runner's thread only.
public final class BatchSession {
    let jobs: [Job]
    let queue: JobQueue
    let options: DaemonOptions
    let stop: StopFlag
    let lostLeases: LostLeases
    let snapshotURL: (Int64) -> URL
    let identity: (Job) -> SnapshotIdentity
    /// Jobs (indices) whose snapshot path this session has recorded in the queue.
    private var recordedSnapshotPaths: Set<Int> = []
    let logLine: @Sendable (String) -> Void
    let progress: @Sendable (DaemonProgress) -> Void
    let start: Date
    let doneBefore: Int
    let remainingAtStart: Int
    var generatedTokens: Int
    var finishedInBatch = 0
    /// Jobs (indices) removed because their cancel was requested.
    private(set) var cancelled: Set<Int> = []
    /// Jobs (indices) removed because their lease was lost: no snapshot, no result.
    private(set) var abandoned: Set<Int> = []

    init(jobs: [Job], queue: JobQueue, options: DaemonOptions, stop: StopFlag, lostLeases: LostLeases, snapshotURL: @escaping (Int64) -> URL,
         identity: @escaping (Job) -> SnapshotIdentity, log: @escaping @Sendable (String) -> Void, progress: @escaping @Sendable (DaemonProgress) -> Void,
         start: Date, done: Int, remaining: Int, generatedTokens: Int) {
        self.jobs = jobs
        self.queue = queue
        self.options = options
        self.stop = stop
        self.lostLeases = lostLeases
        self.snapshotURL = snapshotURL
        self.identity = identity
        self.logLine = log
        self.progress = progress
        self.start = start
        self.doneBefore = done
        self.remainingAtStart = remaining
        self.generatedTokens = generatedTokens
    }

    /// Decides what happens before the next decode step.
    public func afterStep(_ step: BatchStep) -> BatchDirective {
        generatedTokens += step.newTokens
        finishedInBatch += step.finished.count
        progress(DaemonProgress(done: doneBefore + finishedInBatch, remaining: remainingAtStart - finishedInBatch,
                                generatedTokens: generatedTokens, elapsedSeconds: Date().timeIntervalSince(start)))
        var directive = BatchDirective()
        if options.keepKV { directive.snapshot.formUnion(step.finished) }
        let lost = lostLeases.ids
        let losing = step.generating.filter { lost.contains(jobs[$0].id) }
        abandoned.formUnion(losing)
        directive.remove.formUnion(losing)
        let held = step.generating.filter { !lost.contains(jobs[$0].id) }
        guard !held.isEmpty else { return directive }
        let requested: Set<Int64>
        do {
            requested = try queue.cancelRequested(among: held.map { jobs[$0].id })
        } catch {
            logLine("cannot read cancel requests at decode step \(step.step): \(error)")
            requested = []
        }
        let cancelling = held.filter { requested.contains(jobs[$0].id) }
        cancelled.formUnion(cancelling)
        directive.remove.formUnion(cancelling)
        let going = held.filter { !requested.contains(jobs[$0].id) }
        if stop.isStopped {
            directive.snapshot.formUnion(going)
            directive.remove.formUnion(going)
            finishedInBatch += going.count
        } else if options.snapshotEvery > 0 && step.step > 0 && step.step % options.snapshotEvery == 0 {
            directive.snapshot.formUnion(going)
        }
        return directive
    }

    /// Writes job `index`'s snapshot atomically, stamped with its identity; a failure is logged and
    /// the batch goes on. The path is recorded in the queue first (once per job), so `prune` finds
    /// the file even if this process dies right after writing it.
    public func snapshotTaken(job index: Int, payload: Data) {
        let job = jobs[index]
        let url = snapshotURL(job.id)
        do {
            if !recordedSnapshotPaths.contains(index) {
                try queue.recordSnapshotPath(job: job.id, path: url.path)
                recordedSnapshotPaths.insert(index)
            }
            try SnapshotFile.write(payload, identity: identity(job), to: url)
        } catch {
            logLine("job \(job.id): \(error)")
        }
    }

    public func log(_ line: String) { logLine(line) }

    /// Where job `index`'s snapshot is written.
    public func snapshotURL(job index: Int) -> URL { snapshotURL(jobs[index].id) }
}
