// The daemon loop (ARCHITECTURE.md "Queue semantics"): claim a batch in one short transaction,
// keep its leases alive from a heartbeat thread while the engine runs, write each result file
// atomically, then complete (fenced by attempt and owner) or fail each job. It never imports the
// model: the engine reaches it through `BatchRunner`, which the `dllava` executable implements.
import Artifacts
import Foundation
import JobQueue

/// What the engine made of one job.
public enum JobOutcome<Stats: Codable & Sendable>: Sendable {
    case succeeded(text: String, tokenIDs: [Int32], finishReason: String, stats: Stats, timings: JobTimings)
    /// `permanent`: the job can never succeed (an undecodable image, a prompt longer than the
    /// context); otherwise it is retried with backoff.
    case failed(reason: String, permanent: Bool)
}

/// Runs batches of jobs through an engine.
public protocol BatchRunner: Sendable {
    associatedtype Stats: Codable & Sendable
    /// Identifies the model in result files.
    var fingerprint: ModelFingerprint { get }
    /// One outcome per job, in order. A job's outcome must not depend on its batch-mates.
    func run(_ jobs: [Job]) -> [JobOutcome<Stats>]
}

public struct DaemonOptions: Sendable {
    public var batchSize = 8
    /// Lease length; the heartbeat renews it every third of it.
    public var leaseMilliseconds: Int64 = 5 * 60_000
    /// Stop when nothing is claimable (rather than polling for new work).
    public var untilEmpty = false
    public var maxJobs: Int? = nil
    public var maxSeconds: Double? = nil
    /// Seconds between polls of an empty queue.
    public var pollSeconds: Double = 2
    public var owner = "\(ProcessInfo.processInfo.hostName)-\(getpid())-\(UUID().uuidString.prefix(8))"

    public init() {}
}

/// Counts of one daemon run.
public struct DaemonReport: Sendable, Equatable {
    public var claimed = 0
    public var succeeded = 0
    public var failed = 0
    public var retried = 0
    /// Results the queue refused (the lease had been lost to another worker).
    public var discarded = 0
    public var generatedTokens = 0
}

/// A flag set from a signal handler or another thread; read between batches.
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

    public init(queue: JobQueue, runner: Runner, results: ResultFile, options: DaemonOptions) {
        self.queue = queue
        self.runner = runner
        self.results = results
        self.options = options
    }

    /// Runs until the queue is empty (`untilEmpty`), `maxJobs` or `maxSeconds` is reached, or
    /// `stop` is set; a batch in flight is finished first (graceful shutdown: no new claims).
    /// `log` receives one line per batch.
    public func run(stop: StopFlag, log: @Sendable (String) -> Void) throws -> DaemonReport {
        var report = DaemonReport()
        let start = Date()
        while !stop.isStopped {
            if let maxSeconds = options.maxSeconds, Date().timeIntervalSince(start) >= maxSeconds { break }
            var limit = options.batchSize
            if let maxJobs = options.maxJobs {
                limit = min(limit, maxJobs - report.claimed)
                if limit <= 0 { break }
            }
            let jobs = try queue.claim(owner: options.owner, limit: limit, leaseDuration: options.leaseMilliseconds)
            if jobs.isEmpty {
                if options.untilEmpty { break }
                Thread.sleep(forTimeInterval: options.pollSeconds)
                continue
            }
            report.claimed += jobs.count
            let batchStart = Date()
            let outcomes = withHeartbeat(jobs) { runner.run(jobs) }
            for (job, outcome) in zip(jobs, outcomes) {
                try finish(job, outcome, report: &report)
            }
            let seconds = Date().timeIntervalSince(batchStart)
            let counts = try queue.counts()
            let remaining = (counts[.available] ?? 0) + (counts[.retryable] ?? 0) + (counts[.running] ?? 0)
            log(String(format: "batch of %d in %.1f s: %d succeeded, %d failed so far; %d tokens generated; %d left in the queue",
                       jobs.count, seconds, report.succeeded, report.failed, report.generatedTokens, remaining))
        }
        return report
    }

    /// Writes the result and completes the job, or records its failure.
    func finish(_ job: Job, _ outcome: JobOutcome<Runner.Stats>, report: inout DaemonReport) throws {
        switch outcome {
        case .succeeded(let text, let tokenIDs, let finishReason, let stats, let timings):
            let now = Int64(Date().timeIntervalSince1970 * 1000)
            let record = ResultRecord(jobID: job.id, attempt: job.attempt, customID: job.customID, text: text, tokenIDs: tokenIDs,
                                      finishReason: finishReason, parameters: job.parameters, stats: stats, model: runner.fingerprint,
                                      timings: ResultTimings(enqueuedAt: job.createdAt, startedAt: job.startedAt ?? now, finishedAt: now))
            let written = try results.write(record)
            if try queue.complete(job: job.id, attempt: job.attempt, owner: options.owner,
                                  output: JobOutput(path: written.url.path, sha256: written.sha256, timings: timings)) {
                report.succeeded += 1
                report.generatedTokens += tokenIDs.count
            } else {
                report.discarded += 1
            }
        case .failed(let reason, let permanent):
            switch try queue.fail(job: job.id, attempt: job.attempt, owner: options.owner, error: reason, permanent: permanent) {
            case .failed?: report.failed += 1
            case nil: report.discarded += 1
            default: report.retried += 1
            }
        }
    }

    /// Runs `body` while a thread renews the jobs' leases every third of the lease, so long
    /// matrix products never starve the heartbeat.
    func withHeartbeat<T>(_ jobs: [Job], _ body: () -> T) -> T {
        let done = StopFlag()
        let ids = jobs.map(\.id)
        let queue = queue, owner = options.owner, lease = options.leaseMilliseconds
        let thread = Thread {
            let interval = Double(lease) / 3000
            var next = Date().addingTimeInterval(interval)
            while !done.isStopped {
                Thread.sleep(forTimeInterval: min(0.2, interval))
                if Date() >= next {
                    _ = try? queue.heartbeat(jobs: ids, owner: owner, leaseDuration: lease)
                    next = Date().addingTimeInterval(interval)
                }
            }
        }
        thread.start()
        defer { done.stop() }
        return body()
    }
}
