// The daemon loop (docs/FORMATS.md "Queue semantics"): claim jobs in short transactions, keep
// their leases alive from a heartbeat thread, drive the engine's batch one decode step at a time,
// and at every step boundary settle finished jobs (result file written atomically, completion
// fenced by attempt and owner), let cancelled or lost jobs leave, write KV snapshots, and refill
// the freed places with newly claimed jobs. It never imports the model: the engine reaches it
// through `BatchRunner` (BatchRunner.swift), which the `dllava` executable implements.
import Artifacts
import Foundation
import JobQueue
import Logging

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
    /// LISTEN/NOTIFY), and, while jobs run, the wait before claiming again after a claim that found nothing.
    public var pollSeconds: Double = 2
    public var owner = "\(ProcessInfo.processInfo.hostName)-\(getpid())-\(UUID().uuidString.prefix(8))"
    /// How often each running job's snapshot gains a frame. The first frame is written right after the job's
    /// prefill (unless `never`); a graceful shutdown writes one anyway. The daemon holds frames back (stretching the
    /// interval) while one more would make writing snapshots take more than `snapshotBudget` of the decode time.
    public var snapshotInterval = SnapshotInterval.milliseconds(30_000)
    /// Keep each job's final snapshot (taken when it finishes) instead of deleting its snapshot.
    public var keepKV = false
    /// The share of decode time that writing snapshots may take.
    public static let snapshotBudget = 0.02
    /// A running job's snapshot is rewritten as one full frame (compacted) when appending would make it larger
    /// than this many times its live size, and a finished job's kept snapshot when larger than
    /// `finalCompactionFactor` times it: a file within that holds little that is not live, and rewriting it would
    /// double the bytes written.
    public static let compactionFactor = 2.0
    public static let finalCompactionFactor = 1.25
    /// Nanoseconds on a monotonic clock: what decode steps and snapshot writes are timed with, and what a
    /// snapshot interval in milliseconds is measured on. Tests inject a clock they move by hand.
    public var stopwatch: @Sendable () -> UInt64 = { DispatchTime.now().uptimeNanoseconds }

    public init() {}
}

/// How often a running job's snapshot gains a frame (`--snapshot-every`).
public enum SnapshotInterval: Sendable, Equatable, CustomStringConvertible {
    /// Only on a graceful shutdown (and at the end with `keepKV`).
    case never
    /// Every this many of the job's decode steps.
    case steps(Int)
    /// Every this many milliseconds of the job's time in the batch.
    case milliseconds(Int64)

    /// `32` (steps), `30s` or `2m` (a duration, as `DurationText` reads it); `0` is `never`. Nil for anything else.
    public init?(_ text: String) {
        if let steps = Int(text), steps >= 0 {
            self = steps == 0 ? .never : .steps(steps)
        } else if let milliseconds = DurationText.milliseconds(text) {
            self = milliseconds == 0 ? .never : .milliseconds(milliseconds)
        } else {
            return nil
        }
    }

    public var description: String {
        switch self {
        case .never: "never"
        case let .steps(steps): "\(steps) step\(steps == 1 ? "" : "s")"
        case let .milliseconds(milliseconds): milliseconds < 1_000 ? "\(milliseconds) ms" : DurationText.describe(milliseconds: milliseconds)
        }
    }
}

/// Faults the daemon names itself (the others are the queue's or the file system's errors).
public enum DaemonFault: Error, Sendable, CustomStringConvertible {
    /// A job's result could not be stored (a full disk, a read-only or vanished `--out`).
    case resultUnwritable(job: Int64, path: String, reason: String)
    /// The queue keeps no results itself (SQLite) and no output folder was given.
    case noOutputFolder(queue: String)

    public var description: String {
        switch self {
        case let .resultUnwritable(job, path, reason): "cannot write the result of job \(job) to \(path): \(reason)"
        case let .noOutputFolder(queue):
            "the queue \(queue) keeps its results and snapshots as files: give the folder for them with --out"
        }
    }
}

/// A run stopped by a fault: what it did until then, the cause, and what became of its batch.
public struct DaemonStopped: Error {
    public var report: DaemonReport
    public var underlying: Error
    /// Running jobs handed back to the queue without counting their attempt.
    public var released: Int
    /// Running jobs the database would not take back: they stay `running` until their lease
    /// expires (then the attempt counts).
    public var unreleased: Int

    /// What happened to the running jobs, as a clause to follow the cause.
    public var batchNote: String {
        var note = "released \(released) job\(released == 1 ? "" : "s") of the batch to the queue without counting the attempt"
        if unreleased > 0 { note += "; \(unreleased) stay running until their lease expires" }
        return note
    }
}

/// Why a claimed job's image is refused before the engine sees it (a sentence naming the file).
/// (Top level, not nested in the generic daemon: a typed throw of a generic nested type crashes
/// Swift 6.3's optimizer.)
struct ImageRefused: Error {
    var reason: String
}

/// Counts of one daemon run.
public struct DaemonReport: Sendable, Equatable {
    public var claimed = 0
    public var succeeded = 0
    public var failed = 0
    public var retried = 0
    /// Results the queue refused, or running jobs dropped, because the lease had been lost to
    /// another worker.
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

/// A flag set from a signal handler or another thread; read at every decode step.
public final class StopFlag: @unchecked Sendable {
    private let lock = NSLock()
    private var stopped = false

    public init() {}

    public func stop() { lock.withLock { stopped = true } }
    public var isStopped: Bool { lock.withLock { stopped } }
}

/// The daemon: it owns the generation loop. At every decode-step boundary it settles finished
/// jobs, drops jobs whose lease was lost, lets cancelled jobs leave, writes snapshots, and fills
/// the places freed with newly claimed jobs (continuous batching), so the batch never idles while
/// its longest job finishes.
public struct BatchDaemon<Runner: BatchRunner>: Sendable {
    public let queue: JobQueue
    public let runner: Runner
    /// Where results and snapshots go: the queue's database when it stores them (PostgreSQL), with each result also
    /// written as a file under `out` when one is given; else files under `out` (SQLite).
    public let artifacts: ArtifactStore
    /// The files under `<out>/<queue identity>/`, when `out` was given.
    public let files: DirectoryArtifactStore?
    public let options: DaemonOptions
    public let metrics: DaemonMetrics
    /// The queue's snapshot key: every snapshot this daemon writes is tagged with it, and one whose tags fail is refused.
    let snapshotKey: SnapshotKey

    /// Files go under `<out>/<queue identity>/`: results `<job id>-<attempt>.json.zst`, snapshots
    /// `snapshots/job-<job id>.kv.zst`. Job ids are never reused within a queue and the identity is a UUID, so
    /// neither a later job nor another queue sharing `out` can write or read these names. `out` may be nil only for
    /// a queue that stores results and snapshots itself (`DaemonFault.noOutputFolder`).
    public init(queue: JobQueue, runner: Runner, out: URL?, options: DaemonOptions, metrics: DaemonMetrics = DaemonMetrics()) throws {
        self.queue = queue
        self.runner = runner
        self.options = options
        self.metrics = metrics
        snapshotKey = SnapshotKey(secret: queue.snapshotSecret)
        files = try out.map { try DirectoryArtifactStore(queue: queue, out: $0) }
        if let stored = queue.storedArtifacts {
            artifacts = files.map { ResultFileMirror(stored: stored, files: $0) } ?? stored
        } else {
            guard let files else { throw DaemonFault.noOutputFolder(queue: queue.location) }
            artifacts = files
        }
    }

    /// What a snapshot of `job` must carry to be resumed by it.
    func snapshotIdentity(_ job: Job) -> SnapshotIdentity {
        SnapshotIdentity(model: runner.fingerprint.fingerprint, queue: queue.identity, job: job.id, imageSHA256: job.imageSHA256,
                         prompt: job.prompt, parameters: job.parameters.canonicalJSON())
    }

    /// Runs until the queue is empty (`untilEmpty`), or until `maxJobs` or `maxSeconds` is reached
    /// and the running jobs have finished, or until `stop` is set. Graceful shutdown: once `stop`
    /// is set nothing new is claimed, and at the next decode step every running job is
    /// snapshotted, leaves the batch and is released to the queue. `log` receives one line per
    /// admission of jobs and per notable event; `progress` is called after every decode step.
    ///
    /// At start it sweeps what earlier runs left behind (`sweep`). A fault that makes going on
    /// pointless (a result file that cannot be written, as on a full disk; a database write that
    /// fails) stops the run: the unsettled jobs are released to the queue without counting their
    /// attempt (as far as the database still takes writes) and `DaemonStopped` is thrown with the
    /// report so far and the cause.
    ///
    /// Log events carry `worker` (the owner name) and, for a job's events, `job_id` and `custom_id` as metadata; the
    /// messages read on their own ("job 7: cancelled at a decode step").
    public func run(stop: StopFlag, logger: Logger, progress: @escaping @Sendable (DaemonProgress) -> Void = { _ in }) throws -> DaemonReport {
        var logger = logger
        logger[metadataKey: "worker"] = .string(options.owner)
        var loop = Loop(daemon: self, batch: runner.makeBatch(), stop: stop, logger: logger, progress: progress)
        do {
            try sweep(log: { [logger] in logger.notice("\($0)") })
            try queue.register(WorkerRecord.current(owner: options.owner, leaseMilliseconds: options.leaseMilliseconds, now: queue.clock.now()))
        } catch {
            throw DaemonStopped(report: loop.report, underlying: error, released: 0, unreleased: 0)
        }
        defer {
            do { try queue.unregister(owner: options.owner) } catch { logger.warning("cannot remove this worker's record: \(error)") }
        }
        let heartbeat = Heartbeat(queue: queue, owner: options.owner, leaseMilliseconds: options.leaseMilliseconds)
        defer { heartbeat.stop() }
        defer { loop.countMetrics() }
        defer { loop.logSnapshotCost() }
        do {
            try loop.run(heartbeat: heartbeat)
        } catch {
            var released = 0
            let unsettled = loop.unsettled.sorted()
            if !unsettled.isEmpty {
                do {
                    released = try queue.release(jobs: unsettled, owner: options.owner)
                    loop.report.released += released
                } catch {
                    logger.error("cannot release jobs \(unsettled.map(String.init).joined(separator: ", ")): \(error); they are rescued when their lease expires")
                }
            }
            throw DaemonStopped(report: loop.report, underlying: error, released: released, unreleased: unsettled.count - released)
        }
        return loop.report
    }

    /// `run(stop:logger:progress:)` with each log message's text handed to `log`.
    public func run(stop: StopFlag, log: @escaping @Sendable (String) -> Void,
                    progress: @escaping @Sendable (DaemonProgress) -> Void = { _ in }) throws -> DaemonReport {
        try run(stop: stop, logger: Logger(label: "dllava") { _ in MessageLogHandler(emit: log) }, progress: progress)
    }

    /// One run's loop state: the batch, its jobs, and the counts.
    struct Loop {
        let daemon: BatchDaemon
        let batch: Runner.Batch
        let stop: StopFlag
        let logger: Logger
        let progress: @Sendable (DaemonProgress) -> Void
        var report = DaemonReport()
        /// The report as the metrics last counted it.
        var counted = DaemonReport()
        /// Claimed jobs the queue has not yet been told the fate of: what a fault hands back.
        var unsettled: Set<Int64> = []
        /// The jobs in the batch.
        var running: [Int64: Job] = [:]
        /// Decode steps each job in the batch has run since it entered.
        var steps: [Int64: Int] = [:]
        /// Decode steps each job's state had run when it entered the batch (those of the snapshot it resumed from).
        var resumedSteps: [Int64: Int] = [:]
        /// Each job's progress (`JobProgress.reached`) as of its newest stored snapshot frame.
        var savedProgress: [Int64: Int64] = [:]
        /// Bytes of each job's snapshot that the store holds and that end with a whole frame: where the next frame is
        /// appended. No entry: none known, and the next frame is written as a whole new snapshot.
        var storedSnapshotBytes: [Int64: Int] = [:]
        /// Each job's step count and the stopwatch when its snapshot last gained a frame (or when it entered with
        /// one); a job without an entry has none yet, and gets its first frame at the next step boundary.
        var lastFrame: [Int64: (step: Int, nanoseconds: UInt64)] = [:]
        /// Time spent taking and storing snapshot frames, and stepping the batch, in this run; and what the last
        /// frame took (what the next is expected to take).
        var snapshotNanoseconds: UInt64 = 0
        var decodeNanoseconds: UInt64 = 0
        var lastFrameNanoseconds: UInt64 = 0
        /// Snapshot frames stored in this run, and their bytes (compactions included).
        var snapshotFrames = 0
        var snapshotBytes = 0
        /// The share of decode time snapshots had taken when a frame was last held back (logged); nil before.
        var loggedShare: Double?
        /// Tokens generated so far, counted at every step (for the progress display).
        var tokensGenerated = 0
        /// When a claim last found nothing: while jobs run, the next is tried `pollSeconds` later.
        var lastEmptyClaim: Int64? = nil
        var waitingReported = false
        /// Jobs left in the queue at the last admission, and `done` then.
        var remainingAtAdmission = 0
        var doneAtAdmission = 0
        let start: Int64

        init(daemon: BatchDaemon, batch: Runner.Batch, stop: StopFlag, logger: Logger, progress: @escaping @Sendable (DaemonProgress) -> Void) {
            self.daemon = daemon
            self.batch = batch
            self.stop = stop
            self.logger = logger
            self.progress = progress
            start = daemon.queue.clock.now()
        }

        var options: DaemonOptions { daemon.options }

        /// Counts in the metrics what the report gained since the last call.
        mutating func countMetrics() {
            daemon.metrics.count(from: counted, to: report)
            counted = report
            daemon.metrics.jobsRunning.record(running.count)
        }

        /// A log line of the run as a whole.
        func log(_ message: String, level: Logger.Level = .info) {
            logger.log(level: level, "\(message)")
        }

        /// Logs a line about `job`, with its id and custom id as metadata.
        func log(_ message: String, job: Job, level: Logger.Level = .info) {
            var metadata: Logger.Metadata = ["job_id": "\(job.id)"]
            if let customID = job.customID { metadata["custom_id"] = .string(customID) }
            logger.log(level: level, "\(message)", metadata: metadata)
        }

        /// `log(_:job:level:)` as a closure, for the daemon's functions that take one.
        func logger(for job: Job, level: Logger.Level = .info) -> (String) -> Void {
            { log($0, job: job, level: level) }
        }
        /// Jobs this run finished: succeeded, failed, cancelled or released.
        var done: Int { report.succeeded + report.failed + report.cancelled + report.released }
        var queue: JobQueue { daemon.queue }

        /// Claims may go on: no stop, and neither the time nor the job limit reached.
        var mayClaim: Bool {
            if stop.isStopped { return false }
            if let maxSeconds = options.maxSeconds, Double(queue.clock.now() - start) / 1000 >= maxSeconds { return false }
            if let maxJobs = options.maxJobs, report.claimed >= maxJobs { return false }
            return true
        }

        /// A claim is due: there is room, claims may go on, and either nothing runs or the last
        /// claim found work (or was `pollSeconds` ago).
        var claimDue: Bool {
            guard mayClaim && running.count < options.batchSize else { return false }
            guard !running.isEmpty, let lastEmptyClaim else { return true }
            return queue.clock.now() - lastEmptyClaim >= Int64(options.pollSeconds * 1000)
        }

        mutating func run(heartbeat: Heartbeat) throws {
            while true {
                if claimDue {
                    var limit = options.batchSize - running.count
                    if let maxJobs = options.maxJobs { limit = min(limit, maxJobs - report.claimed) }
                    let claimed = try claim(limit: limit)
                    if claimed.isEmpty {
                        lastEmptyClaim = queue.clock.now()
                        if running.isEmpty {
                            countMetrics()
                            let counts = try queue.counts()
                            daemon.metrics.queueDepth.record((counts[.available] ?? 0) + (counts[.retryable] ?? 0))
                            if try waitForWork() { continue }
                            return
                        }
                    } else {
                        lastEmptyClaim = nil
                        waitingReported = false
                        try admit(claimed, heartbeat: heartbeat)
                    }
                } else if running.isEmpty {
                    return
                }
                try atStepBoundary(heartbeat: heartbeat)
                // Places freed (jobs finished at prefill, cancelled, refused) are filled before the next step.
                if claimDue { continue }
                let generating = batch.generating
                guard !generating.isEmpty else { continue }
                let stepStart = DispatchTime.now(), stepStopwatch = options.stopwatch()
                batch.step()
                decodeNanoseconds += elapsed(since: stepStopwatch)
                daemon.metrics.decodeStep.recordNanoseconds(Int64(DispatchTime.now().uptimeNanoseconds - stepStart.uptimeNanoseconds))
                for id in generating {
                    steps[id, default: 0] += 1
                    recordProgress(of: id, heartbeat: heartbeat)
                }
                tokensGenerated += generating.count
            }
        }

        /// Reclaims dead workers' jobs on this host, then claims up to `limit` jobs.
        mutating func claim(limit: Int) throws -> [Job] {
            let reclaimed = try queue.reclaimJobsOfDeadWorkers()
            if reclaimed > 0 { log("reclaimed \(reclaimed) job\(reclaimed == 1 ? "" : "s") of dead workers on this host", level: .notice) }
            let claimed = try queue.claim(owner: options.owner, limit: limit, leaseDuration: options.leaseMilliseconds)
            report.claimed += claimed.count
            unsettled.formUnion(claimed.map(\.id))
            return claimed
        }

        /// Nothing running and nothing claimable: false to stop (`untilEmpty` and no silent
        /// worker's job to wait for), else true after waiting `pollSeconds`.
        mutating func waitForWork() throws -> Bool {
            if options.untilEmpty {
                let orphans = try queue.orphanedJobs()
                if orphans.isEmpty { return false }
                if !waitingReported {
                    // Silent workers on other hosts: their jobs become claimable when their leases expire.
                    let until = orphans.map(\.leaseExpiresAt).max() ?? 0
                    log("waiting for \(orphans.count) job\(orphans.count == 1 ? "" : "s") of silent workers (\(Set(orphans.map(\.owner)).sorted().joined(separator: ", "))); "
                        + "their leases expire by \(Date(timeIntervalSince1970: Double(until) / 1000))")
                    waitingReported = true
                }
            }
            queue.waitForWork(upTo: options.pollSeconds)
            return true
        }

        /// Checks the claimed jobs' images, reads their snapshots and adds them to the batch
        /// (vision and prefill for all of them together).
        mutating func admit(_ claimed: [Job], heartbeat: Heartbeat) throws {
            let admissionStart = queue.clock.now()
            heartbeat.track(claimed.map(\.id))
            var entries: [BatchEntry] = []
            for job in claimed {
                do {
                    let image = try daemon.checkedImage(job)
                    let snapshot = daemon.readSnapshot(job, log: logger(for: job, level: .warning))
                    if let snapshot {
                        // The engine goes on from it (or starts afresh and then gives a full frame): no frame is due yet.
                        storedSnapshotBytes[job.id] = snapshot.goodBytes
                        lastFrame[job.id] = (0, options.stopwatch())
                        resumedSteps[job.id] = snapshot.frames.last?.decodeSteps ?? 0
                        savedProgress[job.id] = Int64(1 + (snapshot.frames.last?.decodeSteps ?? 0))
                    }
                    entries.append(BatchEntry(job: job, image: image, snapshot: snapshot?.payloads,
                                              snapshotLocation: daemon.artifacts.snapshotLocation(job: job.id)))
                } catch {
                    try settle(job, .failed(reason: error.reason, permanent: true), heartbeat: heartbeat)
                }
            }
            for entry in entries { running[entry.job.id] = entry.job }
            let refused = batch.add(entries, log: { log($0) })
            if let timings = batch.lastAdmissionTimings { daemon.metrics.record(timings) }
            for entry in entries {
                if let outcome = refused[entry.job.id] {
                    try settle(entry.job, outcome, heartbeat: heartbeat)
                } else {
                    recordProgress(of: entry.job.id, heartbeat: heartbeat)
                }
            }
            let counts = try queue.counts()
            daemon.metrics.queueDepth.record((counts[.available] ?? 0) + (counts[.retryable] ?? 0))
            countMetrics()
            remainingAtAdmission = (counts[.available] ?? 0) + (counts[.retryable] ?? 0) + (counts[.running] ?? 0)
            doneAtAdmission = done
            let admitted = entries.count - refused.count
            let seconds = String(format: "%.1f", Double(queue.clock.now() - admissionStart) / 1000)
            var stages = "vision and prefill"
            if let timings = batch.lastAdmissionTimings {
                if timings.packingSeconds >= 0.005 { stages += String(format: "; %.2f s of it packing weights on first use", timings.packingSeconds) }
                if timings.sharedPrefixJobs > 0 { stages += "; \(timings.sharedPrefixJobs) on a cached image prefix" }
            }
            log("admitted \(admitted) job\(admitted == 1 ? "" : "s") in \(seconds) s (\(stages)); \(running.count) running; "
                + "\(report.succeeded) succeeded, \(report.failed) failed so far; \(report.generatedTokens) tokens generated; \(remainingAtAdmission) left in the queue")
        }

        /// Between two decode steps: finished jobs are settled; jobs whose lease was lost leave;
        /// cancelled jobs leave; on a stop every job is snapshotted, leaves and is released;
        /// otherwise the jobs due a snapshot get one.
        mutating func atStepBoundary(heartbeat: Heartbeat) throws {
            for id in batch.finished {
                guard let job = running[id] else { continue }
                if options.keepKV { takeSnapshot(of: job, compactionFactor: DaemonOptions.finalCompactionFactor) }
                guard let outcome = batch.remove(job: id) else { preconditionFailure("a finished job has an outcome") }
                try settle(job, outcome, heartbeat: heartbeat)
                if options.keepKV, case .succeeded = outcome {
                    log("job \(id): final KV snapshot kept at \(daemon.artifacts.snapshotLocation(job: id))", job: job)
                }
            }
            let lost = heartbeat.lost
            for id in batch.generating where lost.contains(id) {
                _ = batch.remove(job: id)
                if let job = running[id] {
                    log("job \(id): its lease was lost (rescued by another worker, or finalised); dropped at a decode step", job: job, level: .warning)
                }
                forget(id, heartbeat: heartbeat)
                report.discarded += 1
            }
            let generating = batch.generating
            if !generating.isEmpty {
                let requested: Set<Int64>
                do {
                    requested = try queue.cancelRequested(among: generating)
                } catch {
                    log("cannot read cancel requests at a decode step: \(error)", level: .warning)
                    requested = []
                }
                for id in generating where requested.contains(id) {
                    guard let job = running[id] else { continue }
                    _ = batch.remove(job: id)
                    if try queue.acknowledgeCancel(job: id, attempt: job.attempt, owner: options.owner) {
                        report.cancelled += 1
                        daemon.removeSnapshot(job: id, log: logger(for: job, level: .warning))
                        log("job \(id): cancelled at a decode step", job: job, level: .notice)
                    } else {
                        report.discarded += 1
                    }
                    forget(id, heartbeat: heartbeat)
                }
            }
            let going = batch.generating
            if stop.isStopped && !going.isEmpty {
                for id in going {
                    if let job = running[id] { takeSnapshot(of: job, compactionFactor: DaemonOptions.compactionFactor) }
                    _ = batch.remove(job: id)
                }
                report.released += try queue.release(jobs: going, owner: options.owner)
                for id in going { forget(id, heartbeat: heartbeat) }
                log("released jobs \(going.map(String.init).joined(separator: ", ")) to the queue; their snapshots are in \(daemon.snapshotStorage)", level: .notice)
            } else if options.snapshotInterval != .never {
                for id in going {
                    guard let job = running[id], snapshotDue(id) else { continue }
                    takeSnapshot(of: job, compactionFactor: DaemonOptions.compactionFactor)
                }
            }
            countMetrics()
            progress(DaemonProgress(done: done, remaining: max(0, remainingAtAdmission - (done - doneAtAdmission)),
                                    generatedTokens: tokensGenerated, elapsedSeconds: Double(queue.clock.now() - start) / 1000))
        }

        /// Records what became of a job in the queue (result file and completion, or failure).
        mutating func settle(_ job: Job, _ outcome: JobOutcome<Runner.Batch.Stats>, heartbeat: Heartbeat) throws {
            let succeededBefore = report.succeeded
            try daemon.finish(job, outcome, report: &report, log: logger(for: job, level: .warning))
            switch outcome {
            case .succeeded(_, let tokenIDs, let finishReason, let stats, _):
                if report.succeeded > succeededBefore, let measurements = batch.measurements(of: stats) { daemon.metrics.record(measurements) }
                log("job \(job.id): succeeded (\(tokenIDs.count) tokens, \(finishReason))", job: job, level: .debug)
            case .failed(let reason, _):
                log("job \(job.id): \(reason)", job: job, level: .warning)
            }
            forget(job.id, heartbeat: heartbeat)
        }

        /// Hands the heartbeat a job in the batch's progress (`JobProgress`): 1 for its prefill, plus the decode steps
        /// its state has run, those of the snapshot it resumed from included (a snapshot the engine then refuses makes
        /// this overstate by steps an earlier attempt reached); and that figure as of its newest stored frame.
        func recordProgress(of id: Int64, heartbeat: Heartbeat) {
            heartbeat.record(JobProgress(reached: Int64(1 + (resumedSteps[id] ?? 0) + (steps[id] ?? 0)), saved: savedProgress[id] ?? 0), of: id)
        }

        /// Drops what the loop holds about a job that has left the batch and been settled.
        mutating func forget(_ id: Int64, heartbeat: Heartbeat) {
            running[id] = nil
            steps[id] = nil
            resumedSteps[id] = nil
            savedProgress[id] = nil
            storedSnapshotBytes[id] = nil
            lastFrame[id] = nil
            unsettled.remove(id)
            heartbeat.untrack(id)
        }

        /// Nanoseconds on the stopwatch since `start` (0 should it go backwards).
        func elapsed(since start: UInt64) -> UInt64 {
            let now = options.stopwatch()
            return now > start ? now - start : 0
        }

        /// Whether the job's snapshot is due a frame: its first one (right after prefill), or the interval has passed
        /// since its last and one more frame keeps the time spent writing snapshots within `snapshotBudget` of this
        /// run's decode time. A frame held back by the budget stretches the interval; that is logged the first time,
        /// and again whenever the share of decode time snapshots took has doubled since.
        mutating func snapshotDue(_ id: Int64) -> Bool {
            guard let last = lastFrame[id] else { return true }
            switch options.snapshotInterval {
            case .never: return false
            case let .steps(count): guard (steps[id] ?? 0) - last.step >= count else { return false }
            case let .milliseconds(milliseconds): guard elapsed(since: last.nanoseconds) >= UInt64(milliseconds) * 1_000_000 else { return false }
            }
            let budget = DaemonOptions.snapshotBudget * Double(decodeNanoseconds)
            guard Double(snapshotNanoseconds + lastFrameNanoseconds) > budget else { return true }
            let share = decodeNanoseconds == 0 ? Double.infinity : Double(snapshotNanoseconds) / Double(decodeNanoseconds)
            if loggedShare.map({ share >= 2 * $0 }) ?? true {
                let percent = share.isFinite ? String(format: "%.1f%%", 100 * share) : "all"
                log("writing snapshots has taken \(percent) of the decode time so far, more than the \(Int(DaemonOptions.snapshotBudget * 100))% budget: "
                    + "the snapshot interval (\(options.snapshotInterval)) is stretched until it is back within", level: .notice)
                loggedShare = share
            }
            return false
        }

        /// One line on what snapshots cost this run, when it stored any.
        func logSnapshotCost() {
            guard snapshotFrames > 0 else { return }
            let share = decodeNanoseconds > 0 ? String(format: " (%.1f%% of the %.1f s of decode steps)", 100 * Double(snapshotNanoseconds) / Double(decodeNanoseconds),
                                                       Double(decodeNanoseconds) / 1e9) : ""
            log("snapshots: \(snapshotFrames) frame\(snapshotFrames == 1 ? "" : "s"), \(snapshotBytes) bytes stored in "
                + String(format: "%.2f s", Double(snapshotNanoseconds) / 1e9) + share)
        }

        /// Counts a stored frame of `bytes` bytes.
        mutating func stored(_ bytes: Int) {
            snapshotFrames += 1
            snapshotBytes += bytes
            daemon.metrics.snapshotBytesWritten.increment(by: bytes)
        }

        /// Adds a frame of the job's state to its snapshot, stamped with its identity: appended after the frames the
        /// store holds, or, when none are known, as a whole new snapshot replacing the last one atomically. A
        /// snapshot that appending would make larger than `compactionFactor` times the job's live state is rewritten
        /// as one full frame instead (compaction). A stored frame raises the job's saved progress, which the next
        /// heartbeat carries. A failure is logged, the batch goes on, and the next frame is written whole.
        mutating func takeSnapshot(of job: Job, compactionFactor: Double) {
            let start = options.stopwatch()
            defer {
                lastFrameNanoseconds = elapsed(since: start)
                snapshotNanoseconds += lastFrameNanoseconds
                daemon.metrics.snapshotWrite.recordNanoseconds(Int64(lastFrameNanoseconds))
                lastFrame[job.id] = (steps[job.id] ?? 0, options.stopwatch())
            }
            let stored = storedSnapshotBytes.removeValue(forKey: job.id)
            guard var frame = batch.snapshot(job: job.id, incremental: stored != nil) else { return }
            let location = daemon.artifacts.snapshotLocation(job: job.id)
            do {
                if let stored, frame.kind == .append {
                    let header = SnapshotFile.header(daemon.snapshotIdentity(job), key: daemon.snapshotKey)
                    let bytes = try SnapshotFile.frame(frame, key: daemon.snapshotKey, header: header, offset: stored)
                    if Double(stored + bytes.count) <= compactionFactor * Double(frame.stateBytes) {
                        try daemon.artifacts.appendSnapshot(bytes, job: job.id, after: stored)
                        storedSnapshotBytes[job.id] = stored + bytes.count
                        self.stored(bytes.count)
                        savedProgress[job.id] = Int64(1 + frame.decodeSteps)
                        return
                    }
                    guard let full = batch.snapshot(job: job.id, incremental: false) else { return }
                    log("job \(job.id): compacting its snapshot \(location) (\(stored + bytes.count) bytes with the new frame, "
                        + "\(frame.stateBytes) live)", job: job, level: .debug)
                    frame = full
                }
                let file = try SnapshotFile.encode([frame], identity: daemon.snapshotIdentity(job), key: daemon.snapshotKey)
                try daemon.artifacts.putSnapshot(file, job: job.id)
                storedSnapshotBytes[job.id] = file.count
                self.stored(file.count)
                savedProgress[job.id] = Int64(1 + frame.decodeSteps)
            } catch {
                log("job \(job.id): cannot store its snapshot in \(location): \(error)", job: job, level: .warning)
            }
        }
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
        guard let files else { return }
        let results = files.results
        let now = Date()
        for directory in [results.directory, files.snapshotDirectory] {
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

    /// The bytes of the job's image, read once; refused when the image is no longer the one enqueued (its sha256
    /// differs from the one recorded at enqueue) or cannot be read. Captioning whatever now lies at the path would
    /// give the job another image's caption; handing the engine the checked bytes leaves no moment for the file
    /// to change.
    func checkedImage(_ job: Job) throws(ImageRefused) -> Data {
        let image: Data
        do {
            image = try Self.readImage(job.imagePath)
        } catch {
            throw ImageRefused(reason: "cannot read the image: \(error)")
        }
        let actual = Checksum.sha256Hex(image)
        guard actual == job.imageSHA256 else {
            throw ImageRefused(reason: "the image \(job.imagePath) changed after the job was enqueued (its sha256 is now \(actual), "
                               + "the job recorded \(job.imageSHA256)); enqueue it again to caption the new image")
        }
        return image
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

    /// A job's latest snapshot, or nil when it has none or it is refused (logged; the job then starts from
    /// scratch): a snapshot is used only by the job, of this queue, that wrote it, with the same model contents,
    /// image, prompt and parameters. A torn or damaged tail is logged and the frames before it are used. Reading
    /// changes nothing in the store.
    func readSnapshot(_ job: Job, log: (String) -> Void) -> SnapshotFile.Contents? {
        let location = artifacts.snapshotLocation(job: job.id)
        do {
            guard let stored = try artifacts.snapshot(job: job.id) else { return nil }
            let contents = try SnapshotFile.decode(stored, path: location, expected: snapshotIdentity(job), limits: runner.snapshotLimits,
                                                   key: snapshotKey)
            if let damage = contents.damage {
                log("job \(job.id): \(location) is damaged \(damage); going on from the \(contents.frames.count) good frame\(contents.frames.count == 1 ? "" : "s") before it")
            }
            return contents
        } catch {
            log("job \(job.id): \(error); starting it from scratch")
            return nil
        }
    }

    func removeSnapshot(job: Int64, log: (String) -> Void) {
        do {
            try artifacts.removeSnapshot(job: job)
        } catch {
            log("job \(job): cannot delete its snapshot \(artifacts.snapshotLocation(job: job)): \(error)")
        }
    }

    /// Where this daemon's snapshots are, for messages: the snapshot folder, or the database.
    var snapshotStorage: String { queue.storedArtifacts == nil ? files?.snapshotDirectory.path ?? artifacts.location : artifacts.location }

    /// Writes the result and completes the job, or records its failure.
    /// A finished job's snapshot is deleted (kept with `keepKV` on success); a job that will be
    /// retried keeps it to resume from.
    func finish(_ job: Job, _ outcome: JobOutcome<Runner.Batch.Stats>, report: inout DaemonReport, log: (String) -> Void) throws {
        switch outcome {
        case .succeeded(let text, let tokenIDs, let finishReason, let stats, let timings):
            let now = Int64(Date().timeIntervalSince1970 * 1000)
            let record = ResultRecord(queueID: queue.identity, jobID: job.id, attempt: job.attempt, customID: job.customID, text: text, tokenIDs: tokenIDs,
                                      finishReason: finishReason, parameters: job.parameters, stats: stats, model: runner.fingerprint,
                                      timings: ResultTimings(enqueuedAt: job.createdAt, startedAt: job.startedAt ?? now, finishedAt: now))
            let writeStart = DispatchTime.now()
            defer { metrics.resultWrite.recordNanoseconds(Int64(DispatchTime.now().uptimeNanoseconds - writeStart.uptimeNanoseconds)) }
            let stored: StoredResult
            do {
                stored = try artifacts.putResult(try ResultFile.encode(record), job: job.id, attempt: job.attempt)
            } catch let error as JobQueueError {
                // The queue's database failed (unreachable, full): reported as the queue's failure, not a file's.
                throw error
            } catch {
                let place = files?.results.url(job: job.id, attempt: job.attempt).path ?? artifacts.location
                throw DaemonFault.resultUnwritable(job: job.id, path: place, reason: "\(error)")
            }
            let completed: Bool
            do {
                completed = try queue.complete(job: job.id, attempt: job.attempt, owner: options.owner,
                                               output: JobOutput(path: stored.path, sha256: stored.sha256, timings: timings))
            } catch {
                // No row records the result: remove it rather than leave an orphan.
                try? artifacts.removeResult(job: job.id, attempt: job.attempt)
                throw error
            }
            if !completed { try? artifacts.removeResult(job: job.id, attempt: job.attempt) }
            if completed {
                report.succeeded += 1
                report.generatedTokens += tokenIDs.count
                if !options.keepKV { removeSnapshot(job: job.id, log: log) }
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
        }
    }
}

/// Hands each log message's text to a closure, whatever its level.
struct MessageLogHandler: LogHandler {
    let emit: @Sendable (String) -> Void
    var logLevel: Logger.Level = .info
    var metadata: Logger.Metadata = [:]
    var metadataProvider: Logger.MetadataProvider?

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) { emit("\(event.message)") }
}
