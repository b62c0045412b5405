import Foundation

/// The queue contract: durable job state shared by any number of workers and operators. Two implementations hold to
/// it, and one test suite checks both: `SQLiteJobQueue` (one SQLite file, workers on one machine) and
/// `PostgresJobQueue` (target PostgresQueue: one PostgreSQL database, workers on many machines).
///
/// All times are Unix milliseconds from the queue's clock. Workers fence their results with the attempt number and
/// owner that `claim` gave them: once a job's lease expires and it is rescued, the old worker's `complete` or `fail`
/// is refused. `attempt` only ever grows: it is the fencing token. A retry (`retry`) or a released claim (`release`)
/// grants tries by raising `max_attempts` instead of resetting `attempt`. Errors are `JobQueueError`s.
public protocol JobQueue: AnyObject, Sendable {
    /// Where the queue lives as errors name it: a file path, or a connection URL without its password.
    var location: String { get }
    /// The queue's identity: a lowercase UUID created once with the queue and never changed. Result and snapshot files
    /// are named under it, so neither a second queue sharing an output folder nor a restored copy of another queue can
    /// write or read this queue's files by job id alone.
    var identity: String { get }
    /// The queue's snapshot secret: 32 random bytes created once with the queue (migration v5-snapshot-secret), kept in
    /// its database only. Snapshots are authenticated with it (`SnapshotKey`), so a snapshot file edited by anyone who
    /// cannot read the database is refused.
    var snapshotSecret: Data { get }
    var clock: QueueClock { get }
    /// The queue's own storage of result records and KV snapshots when it keeps them in its database (PostgreSQL), so
    /// that workers need only its location; nil when they are files under the worker's `--out` (SQLite:
    /// `DirectoryArtifactStore`).
    var storedArtifacts: ArtifactStore? { get }

    /// Migration identifiers applied to this queue, in order.
    func appliedMigrations() throws -> [String]

    /// Adds jobs, skipping any whose idempotency key (custom id, or content hash) is already present; a custom id
    /// already queued with another image, prompt or parameters is a conflict and is not enqueued. Jobs are written in
    /// transactions of `jobQueueChunkSize`; a failure part way leaves earlier chunks enqueued, and calling again with
    /// the same jobs is harmless. Invalid jobs are refused (`invalidJob`) before anything is written.
    @discardableResult
    func enqueue(_ jobs: [NewJob]) throws -> EnqueueResult

    /// Claims up to `limit` jobs for `owner`, in the order priority, run_at, id with the jobs about one image
    /// together (`ClaimOrder`), and leases them until `now + leaseDuration` milliseconds. First rescues rows whose
    /// lease expired. No job is ever handed to two workers. Returns them sorted by priority, run_at, id.
    func claim(owner: String, limit: Int, leaseDuration: Int64) throws -> [Job]

    /// Puts running rows whose lease expired back in the queue, as a worker's death (`retryPolicy.deathLimit`,
    /// docs/FORMATS.md "Worker deaths and progress"): `cancelled` when a cancel was requested; `retryable` at once, the
    /// attempt not counted, when the job progressed during it; else the attempt and the death count, and the job is
    /// `failed` at the death limit or after its last attempt, else `retryable` at once. Returns how many rows were
    /// rescued. `claim` does this itself.
    @discardableResult
    func rescueExpiredLeases() throws -> Int

    /// Extends the leases of `jobs` that `owner` still holds to `now + leaseDuration`, raises their recorded progress to
    /// what `progress` gives for them (never lowers it; jobs it leaves out keep theirs), beats the worker registry, and
    /// says which of them a `cancel` asked to stop.
    func heartbeat(jobs: [Int64], owner: String, leaseDuration: Int64, progress: [Int64: JobProgress]) throws -> HeartbeatResult

    /// The jobs among `jobs` whose cancellation was requested (a read; cheap enough for every decode step).
    func cancelRequested(among jobs: [Int64]) throws -> Set<Int64>

    /// Records success. Accepted only while the job is `running` under `owner` with this `attempt`; returns false
    /// otherwise (the lease was rescued and the job handed on: this late result must be discarded). A job whose cancel
    /// was requested but which finished anyway is recorded as succeeded. The same completion again (same attempt,
    /// path and sha256, as when a reply was lost and the call retried) returns true and changes nothing.
    func complete(job id: Int64, attempt: Int, owner: String, output: JobOutput) throws -> Bool

    /// Records a failure, fenced like `complete`; returns the job's new state, or nil when refused. `permanent` goes to
    /// `failed` at once. Otherwise the job becomes `retryable` after the retry policy's delay, or `failed` when this
    /// was its last attempt, or `cancelled` when a cancel was requested meanwhile.
    @discardableResult
    func fail(job id: Int64, attempt: Int, owner: String, error reason: String, permanent: Bool) throws -> JobState?

    /// Finalises a running job as `cancelled` after its worker saw `cancel_requested`; fenced like `complete`.
    func acknowledgeCancel(job id: Int64, attempt: Int, owner: String) throws -> Bool

    /// Hands `owner`'s running jobs among `jobs` back without counting the attempt (graceful shutdown): `available` at
    /// once with one more try allowed, or `cancelled` if a cancel was requested. Returns how many rows were released.
    @discardableResult
    func release(jobs: [Int64], owner: String) throws -> Int

    /// Cancels the jobs `filter` selects: queued ones (available, retryable) become `cancelled` at once; running ones
    /// are flagged and their worker finalises them. Final rows are left alone.
    func cancel(_ filter: JobFilter) throws -> CancelResult

    /// Puts the `failed` and `cancelled` jobs `filter` selects back to `available` (run at once, error and output
    /// cleared) with `attempts` fresh tries: `max_attempts` becomes `attempt + attempts`. Returns how many rows.
    func retry(_ filter: JobFilter, attempts: Int) throws -> Int

    /// Deletes final rows finalised more than `age` milliseconds ago; returns the output and snapshot paths they
    /// recorded (files are not touched here). Their ids are never handed out again.
    func prune(olderThan age: Int64) throws -> PruneResult

    /// Records where `job`'s KV snapshot is written, so `prune` can find it.
    func recordSnapshotPath(job id: Int64, path: String) throws

    func job(id: Int64) throws -> Job?
    func job(customID: String) throws -> Job?
    /// Jobs `filter` selects, by id, starting after `afterID`.
    func list(_ filter: JobFilter, limit: Int, afterID: Int64) throws -> [Job]
    /// Calls `body` with every job `filter` selects, by id, from one consistent snapshot, without holding them all in
    /// memory. `body` must not call this queue object (the PostgreSQL queue holds its connection meanwhile).
    func forEach(_ filter: JobFilter, _ body: (Job) throws -> Void) throws
    /// Rows per state, every state present.
    func counts() throws -> [JobState: Int]
    /// Counts, and throughput over the last `window` milliseconds (see `QueueStatistics.init(counts:...)`).
    func statistics(window: Int64) throws -> QueueStatistics

    /// Records this worker (replacing an earlier record under the same owner).
    func register(_ worker: WorkerRecord) throws
    /// Removes this worker's record at a clean exit.
    func unregister(owner: String) throws
    func workers() throws -> [WorkerRecord]
    /// Running jobs leased by any of `owners`, by id.
    func runningLeases(ownedBy owners: [String]) throws -> [RunningLease]
    /// Hands back `owner`'s running jobs as an expired lease would (a worker's death), with `reason` in their error,
    /// and drops its record (one transaction). Returns how many jobs.
    func reclaimJobs(ofDeadWorker owner: String, reason: String) throws -> Int

    /// Blocks until new work may have arrived or `seconds` have passed (an idle worker's wait between claims).
    func waitForWork(upTo seconds: Double)

    /// The highest job id this queue has handed out, pruned ones included (0 when none): a copy continues after it.
    func highestJobID() throws -> Int64
    /// `dllava copy`: makes this queue, which must hold no jobs (`QueueCopy` checks), the copy of
    /// another: it takes the other's `identity` (so the result and snapshot files named under it belong to the copy)
    /// and hands out new ids only above `highestID`. Queue objects already open (this one included) keep the identity
    /// they read: open the queue again to work on the copy.
    func adoptIdentity(_ identity: String, highestID: Int64) throws
    /// Inserts `jobs` exactly as they are (ids, states, attempts, leases, results), in one transaction.
    func insertCopies(of jobs: [Job]) throws
}

/// Rows a bulk operation changes per write transaction, in both backends.
public let jobQueueChunkSize = 1_000

/// A running job's lease: who holds it and until when.
public struct RunningLease: Sendable, Hashable {
    public var id: Int64
    public var owner: String
    public var expiresAt: Int64

    public init(id: Int64, owner: String, expiresAt: Int64) {
        self.id = id
        self.owner = owner
        self.expiresAt = expiresAt
    }
}

extension JobQueue {
    /// A heartbeat that reports no progress.
    public func heartbeat(jobs: [Int64], owner: String, leaseDuration: Int64) throws -> HeartbeatResult {
        try heartbeat(jobs: jobs, owner: owner, leaseDuration: leaseDuration, progress: [:])
    }

    public func cancel(ids: [Int64]) throws -> CancelResult { try cancel(JobFilter(ids: ids)) }

    public func retry(_ filter: JobFilter) throws -> Int { try retry(filter, attempts: 3) }

    public func retry(ids: [Int64], attempts: Int = 3) throws -> Int { try retry(JobFilter(ids: ids), attempts: attempts) }

    public func list(_ filter: JobFilter = .all, limit: Int = 100) throws -> [Job] { try list(filter, limit: limit, afterID: 0) }

    public func forEach(_ body: (Job) throws -> Void) throws { try forEach(.all, body) }

    public func statistics() throws -> QueueStatistics { try statistics(window: 3_600_000) }

    /// Running jobs whose registered worker is dead or silent. Jobs of owners without a record (workers of an older
    /// dllava) are left to their lease.
    public func orphanedJobs() throws -> [OrphanedJob] {
        let now = clock.now()
        let gone = try workers().compactMap { worker -> (WorkerRecord, WorkerLiveness)? in
            let liveness = worker.liveness(now: now)
            return liveness == .alive ? nil : (worker, liveness)
        }
        guard !gone.isEmpty else { return [] }
        let byOwner = Dictionary(uniqueKeysWithValues: gone.map { ($0.0.owner, $0) })
        return try runningLeases(ownedBy: byOwner.keys.sorted()).map { lease in
            let (worker, liveness) = byOwner[lease.owner]!
            return OrphanedJob(id: lease.id, owner: lease.owner, host: worker.host, liveness: liveness, leaseExpiresAt: lease.expiresAt)
        }
    }

    /// Hands back at once the running jobs of workers on this host whose process is gone, as an expired lease would
    /// (a worker's death: see `rescueExpiredLeases`), and drops their records.
    /// Returns how many jobs were reclaimed. Workers on other hosts are left to their leases.
    @discardableResult
    public func reclaimJobsOfDeadWorkers() throws -> Int {
        let now = clock.now()
        var reclaimed = 0
        for worker in try workers() {
            if case .dead(let reason) = worker.liveness(now: now) { reclaimed += try reclaimJobs(ofDeadWorker: worker.owner, reason: reason) }
        }
        return reclaimed
    }
}

extension NewJob {
    /// Why this job cannot be enqueued, or nil when it can (both backends check every job before writing any).
    func problem() -> String? {
        if prompt.isEmpty { return "empty prompt for image \(imagePath)" }
        if customID?.isEmpty == true { return "empty custom_id for image \(imagePath)" }
        if maxAttempts < 1 { return "max_attempts must be at least 1" }
        return parameters.problem()
    }

    /// Refuses the first job that cannot be enqueued.
    public static func validate(_ jobs: [NewJob]) throws {
        for job in jobs {
            if let problem = job.problem() { throw JobQueueError.invalidJob(reason: problem) }
        }
    }
}

extension EnqueueResult {
    /// Files the outcome of the job at `index` whose key was already taken by the row `existingID`: the same job when
    /// the row holds the same image, prompt and canonical parameters, else a conflict (a custom id names one job).
    public mutating func recordExisting(index: Int, existingID: Int64, sameContent: Bool) {
        if sameContent { alreadyPresent.append(existingID) } else { conflicts.append(Conflict(index: index, existingID: existingID)) }
    }
}

/// Which jobs a bulk operation (`list`, `cancel`, `retry`, `export`) touches. Every set condition must hold;
/// an empty filter selects every job.
public struct JobFilter: Sendable, Hashable {
    public var ids: [Int64]?
    public var customIDs: [String]?
    public var states: Set<JobState>?

    public init(ids: [Int64]? = nil, customIDs: [String]? = nil, states: Set<JobState>? = nil) {
        self.ids = ids
        self.customIDs = customIDs
        self.states = states
    }

    public static let all = JobFilter()

    public var isEmpty: Bool { ids == nil && customIDs == nil && states == nil }
}

/// What `enqueue` did: the ids of new rows, and of rows that already held the same idempotency key (in the
/// order of the jobs given).
public struct EnqueueResult: Sendable, Hashable {
    public var inserted: [Int64] = []
    public var alreadyPresent: [Int64] = []
    /// Jobs whose custom id is already queued with another image, prompt or parameters: not enqueued.
    public var conflicts: [Conflict] = []
    public init() {}

    public struct Conflict: Sendable, Hashable {
        /// Index of the job in the array given to `enqueue`.
        public var index: Int
        /// The queued job holding the custom id.
        public var existingID: Int64
    }
}

/// What a worker hands to `complete`: the result it stored (its file, nil when it lives only in the queue's database;
/// and its sha256) and what it measured.
public struct JobOutput: Sendable, Hashable {
    public var path: String?
    public var sha256: String
    public var timings: JobTimings?

    public init(path: String?, sha256: String, timings: JobTimings? = nil) {
        self.path = path
        self.sha256 = sha256
        self.timings = timings
    }
}

/// What a heartbeat found, per job id given.
public struct HeartbeatResult: Sendable, Hashable {
    /// Still running under this owner; the lease now runs to `now + leaseDuration`.
    public var extended: Set<Int64> = []
    /// No longer this owner's (rescued, cancelled, finished or gone): stop working on them, drop the result.
    public var lost: Set<Int64> = []
    /// Extended, and a `cancel` asked for them to stop: finish them with `acknowledgeCancel`.
    public var cancelRequested: Set<Int64> = []

    public init() {}
}

/// What `cancel` did.
public struct CancelResult: Sendable, Hashable {
    /// Queued rows (available, retryable) now cancelled.
    public var cancelled = 0
    /// Running rows now flagged `cancel_requested`; their worker finalises them.
    public var requested = 0

    public init(cancelled: Int = 0, requested: Int = 0) {
        self.cancelled = cancelled
        self.requested = requested
    }
}

/// Figures for `dllava status`.
public struct QueueStatistics: Sendable, Hashable {
    public var counts: [JobState: Int]
    public var windowMs: Int64
    /// Jobs that succeeded within the window.
    public var succeededInWindow: Int
    /// Succeeded jobs per hour over the part of the window in which work happened; nil with no successes.
    public var jobsPerHour: Double?
    /// available + retryable + running.
    public var remaining: Int { counts[.available, default: 0] + counts[.retryable, default: 0] + counts[.running, default: 0] }
    /// remaining / throughput; nil when there is no throughput to go by.
    public var etaMs: Int64? {
        guard let jobsPerHour, jobsPerHour > 0 else { return remaining == 0 ? 0 : nil }
        return Int64((Double(remaining) / jobsPerHour * 3_600_000).rounded())
    }

    /// Throughput over the window: jobs that succeeded in it divided by the time since the later of the window's start
    /// and the earliest start of those jobs (`firstStart`), so a run that began ten minutes ago is not averaged over
    /// the whole hour.
    public init(counts: [JobState: Int], windowMs: Int64, succeededInWindow: Int, firstStart: Int64?, now: Int64) {
        self.counts = counts
        self.windowMs = windowMs
        self.succeededInWindow = succeededInWindow
        if succeededInWindow > 0 {
            let first = firstStart ?? (now - windowMs)
            let span = max(now - max(now - windowMs, first), 1)
            jobsPerHour = Double(succeededInWindow) / Double(span) * 3_600_000
        }
    }
}

/// What `prune` deleted: how many rows, and the files those rows recorded (not touched by `prune`).
public struct PruneResult: Sendable, Hashable {
    public var deleted = 0
    /// Result files of the deleted rows.
    public var outputPaths: [String] = []
    /// KV snapshot paths of the deleted rows (a kept final snapshot, or one a cancel, release or rescue left); the file
    /// may be gone already.
    public var snapshotPaths: [String] = []

    public init() {}
}


/// What a worker reports of a running job's progress with each heartbeat. A worker's death costs the job no attempt
/// when either figure got past its highest value before the attempt (docs/FORMATS.md, "Worker deaths and progress").
public struct JobProgress: Sendable, Hashable {
    /// How far the job has got: 1 once prefilled, plus each decode step its state has run (steps restored from a
    /// snapshot included).
    public var reached: Int64
    /// `reached` as of the newest snapshot frame stored: where a restart would resume (0 when none is stored).
    public var saved: Int64

    public init(reached: Int64, saved: Int64) {
        self.reached = reached
        self.saved = saved
    }
}

extension Dictionary where Key == Int64, Value == JobProgress {
    /// `{"<id>": [<reached>, <saved>], ...}`: how a heartbeat's progress travels to either database as one argument.
    package var jsonObject: String { "{" + map { "\"\($0.key)\":[\($0.value.reached),\($0.value.saved)]" }.joined(separator: ",") + "}" }
}
