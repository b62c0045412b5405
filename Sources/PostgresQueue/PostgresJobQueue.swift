import Foundation
import JobQueue
import Logging
import PostgresNIO

/// The queue contract on PostgreSQL: one database that workers on many machines share, reached by nothing but its
/// connection URL. The SQLite queue's semantics, statement for statement (the contract tests run on both); what
/// differs is how: claims lock their rows with `FOR UPDATE SKIP LOCKED` in one round trip (`dllava.claim`), and idle
/// workers wait on `LISTEN dllava_work` instead of polling.
///
/// Every operation is one transaction on the queue object's connection (`PostgresSession`), most of them a single
/// statement (one round trip), so a lost connection rolls back whatever was under way and the operation runs again
/// once the server is back (within `reconnectWindow`).
/// Times are Unix milliseconds from `clock`: keep the machines' clocks in sync (NTP), as leases compare them.
public final class PostgresJobQueue: JobQueue {
    public let address: PostgresAddress
    public let clock: QueueClock
    public let retryPolicy: RetryPolicy
    public let identity: String
    public let snapshotSecret: Data
    let session: PostgresSession
    let work: WorkListener
    /// Result records and snapshots live in this database, reached on a second connection (opened at first use): a
    /// large snapshot never holds up a heartbeat, and a store read may run inside `forEach`'s body.
    public let storedArtifacts: ArtifactStore?

    public var location: String { address.description }

    /// Opens the queue at `url`. `.create` applies every migration (creating schema `dllava`); `.readWrite` applies
    /// those missing from an existing queue; `.readOnly` refuses a queue that lacks some (`olderSchema`). A database
    /// without a dllava queue is `noDatabase` unless created; one with migrations this build does not know is
    /// `newerSchema`. A server that cannot be reached within `reconnectWindow` seconds is `database(.unreachable)`;
    /// `report` hears of lost and restored connections.
    public init(url: String, access: SQLiteJobQueue.Access = .readWrite, reconnectWindow: TimeInterval = 10,
                clock: QueueClock = .system, retryPolicy: RetryPolicy = RetryPolicy(),
                report: @escaping @Sendable (String) -> Void = { _ in }) throws {
        address = try PostgresAddress(url)
        self.clock = clock
        self.retryPolicy = retryPolicy
        session = PostgresSession(address: address, reconnectWindow: reconnectWindow, report: report)
        work = WorkListener(address: address)
        storedArtifacts = PostgresArtifactStore(session: PostgresSession(address: address, reconnectWindow: reconnectWindow, report: report),
                                                clock: clock)
        let location = address.description
        (identity, snapshotSecret) = try session.transaction { statements in
            let applied = try PostgresSchema.applied(statements)
            if let applied, !Set(applied).isSubset(of: PostgresSchema.identifiers) { throw JobQueueError.newerSchema(path: location) }
            if applied == nil && access != .create { throw JobQueueError.noDatabase(path: location) }
            if applied != PostgresSchema.identifiers {
                if access == .readOnly { throw JobQueueError.olderSchema(path: location) }
                try PostgresSchema.migrate(statements, now: clock.now())
            }
            guard let uuid = try statements.rows("SELECT uuid FROM dllava.queue WHERE singleton = 1").first?.decode(String.self) else {
                throw JobQueueError.corruptQueue(path: location, reason: "it has no queue identity")
            }
            let hex = try statements.rows("SELECT encode(secret, 'hex') FROM dllava.snapshot_secret WHERE singleton = 1").first?.decode(String.self) ?? ""
            let bytes = stride(from: 0, to: hex.count - 1, by: 2).compactMap { UInt8(hex.dropFirst($0).prefix(2), radix: 16) }
            guard bytes.count == 32 else { throw JobQueueError.corruptQueue(path: location, reason: "it has no snapshot secret") }
            return (uuid, Data(bytes))
        }
    }

    public func appliedMigrations() throws -> [String] {
        try session.statement { try PostgresSchema.applied($0) ?? [] }
    }

    // MARK: Enqueue

    @discardableResult
    public func enqueue(_ jobs: [NewJob]) throws -> EnqueueResult {
        try NewJob.validate(jobs)
        var result = EnqueueResult()
        var canonical: [JobParameters: String] = [:]
        var start = 0
        while start < jobs.count {
            let chunk = jobs[start ..< min(start + jobQueueChunkSize, jobs.count)]
            let now = clock.now()
            let jobsOfChunk = Array(chunk)
            let params = jobsOfChunk.map { job in
                canonical[job.parameters] ?? {
                    let json = job.parameters.canonicalJSON()
                    canonical[job.parameters] = json
                    return json
                }()
            }
            let chunkResult = try session.transaction { statements in
                try Self.insert(jobsOfChunk, params: params, offset: start, now: now, statements)
            }
            result.inserted += chunkResult.inserted
            result.alreadyPresent += chunkResult.alreadyPresent
            result.conflicts += chunkResult.conflicts
            start += chunk.count
        }
        return result
    }

    /// One chunk in one statement: the jobs travel as arrays (`unnest ... WITH ORDINALITY`), the first job of each
    /// idempotency key is inserted in the chunk's order (`ON CONFLICT DO NOTHING`), and each job comes back with its new
    /// id or the row that already held its key. A later job with the key of an earlier one in the same chunk is that
    /// job again, or a conflict with it; a key another transaction inserted meanwhile is read again on its own.
    static func insert(_ jobs: [NewJob], params: [String], offset: Int, now: Int64, _ statements: PostgresStatements) throws -> EnqueueResult {
        let keys = jobs.map(\.idempotencyKey)
        let rows = try statements.rows("""
            WITH input AS (
                SELECT * FROM unnest(\(jobs.map { $0.customID ?? "" })::text[], \(keys)::text[], \(jobs.map(\.imagePath))::text[],
                                     \(jobs.map(\.imageSHA256))::text[], \(jobs.map(\.prompt))::text[], \(params)::text[],
                                     \(jobs.map(\.priority))::bigint[], \(jobs.map(\.maxAttempts))::bigint[],
                                     \(jobs.map { $0.runAt ?? now })::bigint[])
                    WITH ORDINALITY AS t(custom_id, idempotency_key, image_path, image_sha256, prompt, params, priority, max_attempts,
                                         run_at, position)),
            first AS (SELECT DISTINCT ON (idempotency_key) * FROM input ORDER BY idempotency_key, position),
            inserted AS (
                INSERT INTO dllava.job (custom_id, idempotency_key, image_path, image_sha256, prompt, params, priority, state, attempt,
                                        max_attempts, run_at, created_at, updated_at)
                SELECT NULLIF(custom_id, ''), idempotency_key, image_path, image_sha256, prompt, params, priority, 'available', 0,
                       max_attempts, run_at, \(now), \(now)
                FROM first ORDER BY position
                ON CONFLICT DO NOTHING
                RETURNING id, idempotency_key)
            SELECT input.position, inserted.id, existing.id, existing.image_sha256, existing.prompt, existing.params
            FROM input
            LEFT JOIN first ON first.position = input.position
            LEFT JOIN inserted ON inserted.idempotency_key = first.idempotency_key
            LEFT JOIN dllava.job existing ON existing.idempotency_key = input.idempotency_key
            ORDER BY input.position
            """).map { try $0.decode((Int64, Int64?, Int64?, String?, String?, String?).self) }
        var result = EnqueueResult()
        var firstOfKey: [String: (index: Int, id: Int64)] = [:]
        for (index, row) in rows.enumerated() {
            let (_, insertedID, existingID, sha, prompt, storedParams) = row
            let job = jobs[index], key = keys[index]
            if let insertedID {
                result.inserted.append(insertedID)
                firstOfKey[key] = (index, insertedID)
            } else if let existingID {
                result.recordExisting(index: offset + index, existingID: existingID,
                                      sameContent: sha == job.imageSHA256 && prompt == job.prompt && storedParams == params[index])
            } else if let first = firstOfKey[key] {
                let earlier = jobs[first.index]
                result.recordExisting(index: offset + index, existingID: first.id,
                                      sameContent: earlier.imageSHA256 == job.imageSHA256 && earlier.prompt == job.prompt
                                          && params[first.index] == params[index])
            } else {
                // Another transaction inserted the key after this statement's snapshot: read it again.
                guard let existing = try statements.rows("""
                    SELECT id, image_sha256, prompt, params FROM dllava.job WHERE idempotency_key = \(key)
                    """).first else {
                    throw JobQueueError.invalidJob(reason: "custom_id \(job.customID ?? "") conflicts with an existing row")
                }
                let (id, sha, prompt, storedParams) = try existing.decode((Int64, String, String, String).self)
                result.recordExisting(index: offset + index, existingID: id,
                                      sameContent: sha == job.imageSHA256 && prompt == job.prompt && storedParams == params[index])
            }
        }
        return result
    }

    // MARK: Workers

    public func claim(owner: String, limit: Int, leaseDuration: Int64) throws -> [Job] {
        precondition(limit >= 1 && leaseDuration >= 1, "claim needs limit >= 1 and a positive lease")
        let now = clock.now()
        let jobs = try session.statement { statements in
            try statements.rows("""
                SELECT * FROM dllava.claim(\(owner), \(now + leaseDuration), \(now), \(limit)::integer, \(retryPolicy.deathLimit)::integer)
                """).map(Self.job)
        }
        return jobs.sorted { ($0.priority, $0.runAt, $0.id) < ($1.priority, $1.runAt, $1.id) }
    }

    @discardableResult
    public func rescueExpiredLeases() throws -> Int {
        let now = clock.now()
        return try session.statement { statements in
            try statements.rows("""
                SELECT dllava.end_dead_leases(\(now), \(retryPolicy.deathLimit)::integer, \(now), NULL, 'the lease of %W expired', '')
                """).first?.decode(Int.self) ?? 0
        }
    }

    public func heartbeat(jobs: [Int64], owner: String, leaseDuration: Int64, progress: [Int64: JobProgress]) throws -> HeartbeatResult {
        let now = clock.now()
        // The worker registry's beat rides along in the same statement.
        let rows = try session.statement { statements in
            try statements.rows("""
                WITH beat AS (UPDATE dllava.worker SET heartbeat_at = \(now) WHERE owner = \(owner))
                UPDATE dllava.job SET lease_expires_at = \(now + leaseDuration), heartbeat_at = \(now), updated_at = \(now),
                                      progress = GREATEST(progress, COALESCE((\(progress.jsonObject)::jsonb -> id::text ->> 0)::bigint, 0)),
                                      saved_progress = GREATEST(saved_progress, COALESCE((\(progress.jsonObject)::jsonb -> id::text ->> 1)::bigint, 0))
                WHERE id = ANY(\(jobs)) AND state = 'running' AND lease_owner = \(owner)
                RETURNING id, cancel_requested
                """).map { try $0.decode((Int64, Bool).self) }
        }
        var result = HeartbeatResult()
        for (id, cancelRequested) in rows {
            result.extended.insert(id)
            if cancelRequested { result.cancelRequested.insert(id) }
        }
        result.lost = Set(jobs).subtracting(result.extended)
        return result
    }

    public func cancelRequested(among jobs: [Int64]) throws -> Set<Int64> {
        try session.statement { statements in
            Set(try statements.rows("""
                SELECT id FROM dllava.job WHERE id = ANY(\(jobs)) AND state = 'running' AND cancel_requested
                """).map { try $0.decode(Int64.self) })
        }
    }

    public func complete(job id: Int64, attempt: Int, owner: String, output: JobOutput) throws -> Bool {
        let now = clock.now()
        let timings = try output.timings.map { String(decoding: try JSONEncoder().encode($0), as: UTF8.self) }
        // A completion repeated with the same result counts as done: after a connection lost with the reply, the
        // retry finds the commit that went through (and the worker must not delete the file that row records).
        // Stored results of the job's other attempts (late or abandoned ones) go with the accepted completion.
        return try session.statement { statements in
            try statements.rows("""
                WITH done AS (
                    UPDATE dllava.job
                    SET state = 'succeeded', output_path = \(output.path), output_sha256 = \(output.sha256), timings = \(timings), error = NULL,
                        lease_owner = NULL, lease_expires_at = NULL, cancel_requested = false, finalized_at = \(now), updated_at = \(now)
                    WHERE id = \(id) AND state = 'running' AND attempt = \(attempt) AND lease_owner = \(owner)
                    RETURNING id),
                others AS (DELETE FROM dllava.result WHERE job_id IN (SELECT id FROM done) AND attempt <> \(attempt))
                SELECT EXISTS (SELECT 1 FROM done) OR EXISTS (
                    SELECT 1 FROM dllava.job WHERE id = \(id) AND state = 'succeeded' AND attempt = \(attempt)
                                               AND output_path IS NOT DISTINCT FROM \(output.path) AND output_sha256 = \(output.sha256))
                """)[0].decode(Bool.self)
        }
    }

    @discardableResult
    public func fail(job id: Int64, attempt: Int, owner: String, error reason: String, permanent: Bool) throws -> JobState? {
        let now = clock.now()
        let retryAt = now + retryPolicy.delay(afterAttempt: attempt)
        let state = try session.statement { statements in
            try statements.rows("""
                UPDATE dllava.job
                SET state = CASE WHEN \(permanent) THEN 'failed' WHEN cancel_requested THEN 'cancelled'
                                 WHEN attempt >= max_attempts THEN 'failed' ELSE 'retryable' END,
                    run_at = CASE WHEN \(permanent) OR cancel_requested OR attempt >= max_attempts THEN run_at ELSE \(retryAt) END,
                    finalized_at = CASE WHEN \(permanent) OR cancel_requested OR attempt >= max_attempts THEN \(now) END,
                    error = \(reason), lease_owner = NULL, lease_expires_at = NULL, updated_at = \(now)
                WHERE id = \(id) AND state = 'running' AND attempt = \(attempt) AND lease_owner = \(owner)
                RETURNING state
                """).first?.decode(String.self)
        }
        return state.flatMap(JobState.init(rawValue:))
    }

    public func acknowledgeCancel(job id: Int64, attempt: Int, owner: String) throws -> Bool {
        let now = clock.now()
        return try session.statement { statements in
            try statements.execute("""
                UPDATE dllava.job SET state = 'cancelled', lease_owner = NULL, lease_expires_at = NULL, finalized_at = \(now), updated_at = \(now)
                WHERE id = \(id) AND state = 'running' AND attempt = \(attempt) AND lease_owner = \(owner)
                """) == 1
        }
    }

    @discardableResult
    public func release(jobs: [Int64], owner: String) throws -> Int {
        let now = clock.now()
        return try session.statement { statements in
            try statements.execute("""
                UPDATE dllava.job
                SET state = CASE WHEN cancel_requested THEN 'cancelled' ELSE 'available' END,
                    finalized_at = CASE WHEN cancel_requested THEN \(now) END,
                    max_attempts = max_attempts + 1, run_at = \(now), lease_owner = NULL, lease_expires_at = NULL, updated_at = \(now)
                WHERE id = ANY(\(jobs)) AND state = 'running' AND lease_owner = \(owner)
                """)
        }
    }

    // MARK: Operators

    public func cancel(_ filter: JobFilter) throws -> CancelResult {
        var result = CancelResult()
        result.cancelled = try chunked { statements, now in
            try statements.execute("""
                UPDATE dllava.job SET state = 'cancelled', finalized_at = \(now), updated_at = \(now)
                WHERE id IN (SELECT id FROM dllava.job WHERE \(filter: filter) AND state IN ('available', 'retryable') LIMIT \(jobQueueChunkSize))
                """)
        }
        result.requested = try chunked { statements, now in
            try statements.execute("""
                UPDATE dllava.job SET cancel_requested = true, updated_at = \(now)
                WHERE id IN (SELECT id FROM dllava.job WHERE \(filter: filter) AND state = 'running' AND NOT cancel_requested LIMIT \(jobQueueChunkSize))
                """)
        }
        return result
    }

    public func retry(_ filter: JobFilter, attempts: Int) throws -> Int {
        precondition(attempts >= 1, "retry grants at least one attempt")
        return try chunked { statements, now in
            try statements.execute("""
                UPDATE dllava.job
                SET state = 'available', max_attempts = attempt + \(attempts), run_at = \(now), finalized_at = NULL, cancel_requested = false,
                    deaths_without_progress = 0,
                    error = NULL, output_path = NULL, output_sha256 = NULL, timings = NULL, updated_at = \(now)
                WHERE id IN (SELECT id FROM dllava.job WHERE \(filter: filter) AND state IN ('failed', 'cancelled') LIMIT \(jobQueueChunkSize))
                """)
        }
    }

    public func prune(olderThan age: Int64) throws -> PruneResult {
        let cutoff = clock.now() - age
        var result = PruneResult()
        result.deleted = try chunked { statements, _ in
            let rows = try statements.rows("""
                DELETE FROM dllava.job WHERE id IN (SELECT id FROM dllava.job
                    WHERE state IN ('succeeded', 'failed', 'cancelled') AND finalized_at < \(cutoff) ORDER BY id LIMIT \(jobQueueChunkSize))
                RETURNING id, output_path, snapshot_path
                """).map { try $0.decode((Int64, String?, String?).self) }.sorted { $0.0 < $1.0 }
            for (_, output, snapshot) in rows {
                if let output { result.outputPaths.append(output) }
                if let snapshot { result.snapshotPaths.append(snapshot) }
            }
            return rows.count
        }
        return result
    }

    public func recordSnapshotPath(job id: Int64, path: String) throws {
        let now = clock.now()
        try session.statement { statements in
            try statements.execute("""
                UPDATE dllava.job SET snapshot_path = \(path), updated_at = \(now) WHERE id = \(id) AND snapshot_path IS DISTINCT FROM \(path)
                """)
        }
    }

    /// Runs `body` in transactions of at most `jobQueueChunkSize` changed rows until one changes fewer.
    private func chunked(_ body: (PostgresStatements, Int64) throws -> Int) throws -> Int {
        var total = 0
        while true {
            let now = clock.now()
            let changed = try session.statement { try body($0, now) }
            total += changed
            if changed < jobQueueChunkSize { return total }
        }
    }

    // MARK: Reading

    public func job(id: Int64) throws -> Job? {
        try session.statement { try $0.rows("SELECT * FROM dllava.job WHERE id = \(id)").first.map(Self.job) }
    }

    public func job(customID: String) throws -> Job? {
        try session.statement { try $0.rows("SELECT * FROM dllava.job WHERE custom_id = \(customID)").first.map(Self.job) }
    }

    public func list(_ filter: JobFilter, limit: Int, afterID: Int64) throws -> [Job] {
        try session.statement { statements in
            try statements.rows("""
                SELECT * FROM dllava.job WHERE \(filter: filter) AND id > \(afterID) ORDER BY id LIMIT \(limit)
                """).map(Self.job)
        }
    }

    /// Pages through the selection by id inside one REPEATABLE READ transaction: one snapshot, a page in memory.
    public func forEach(_ filter: JobFilter, _ body: (Job) throws -> Void) throws {
        try session.transaction(readOnly: true) { statements in
            var after: Int64 = 0
            while true {
                let page = try statements.rows("""
                    SELECT * FROM dllava.job WHERE \(filter: filter) AND id > \(after) ORDER BY id LIMIT \(jobQueueChunkSize)
                    """).map(Self.job)
                for job in page { try body(job) }
                guard page.count == jobQueueChunkSize, let last = page.last else { return }
                after = last.id
            }
        }
    }

    public func counts() throws -> [JobState: Int] {
        try session.statement { try Self.counts($0) }
    }

    static func counts(_ statements: PostgresStatements) throws -> [JobState: Int] {
        var counts = Dictionary(uniqueKeysWithValues: JobState.allCases.map { ($0, 0) })
        for row in try statements.rows("SELECT state, COUNT(*) FROM dllava.job GROUP BY state") {
            let (name, count) = try row.decode((String, Int64).self)
            if let state = JobState(rawValue: name) { counts[state] = Int(count) }
        }
        return counts
    }

    public func statistics(window: Int64) throws -> QueueStatistics {
        let now = clock.now()
        return try session.transaction(readOnly: true) { statements in
            let counts = try Self.counts(statements)
            let (succeeded, first) = try statements.rows("""
                SELECT COUNT(*), MIN(started_at) FROM dllava.job WHERE state = 'succeeded' AND finalized_at >= \(now - window)
                """)[0].decode((Int64, Int64?).self)
            return QueueStatistics(counts: counts, windowMs: window, succeededInWindow: Int(succeeded), firstStart: first, now: now)
        }
    }

    // MARK: Worker registry

    public func register(_ worker: WorkerRecord) throws {
        try session.statement { statements in
            try statements.execute("""
                INSERT INTO dllava.worker (owner, host, boot_id, pid, process_start, lease_ms, started_at, heartbeat_at)
                VALUES (\(worker.owner), \(worker.host), \(worker.bootID), \(Int(worker.pid))::integer, \(worker.processStart),
                        \(worker.leaseMilliseconds), \(worker.startedAt), \(worker.heartbeatAt))
                ON CONFLICT (owner) DO UPDATE SET host = EXCLUDED.host, boot_id = EXCLUDED.boot_id, pid = EXCLUDED.pid,
                    process_start = EXCLUDED.process_start, lease_ms = EXCLUDED.lease_ms, started_at = EXCLUDED.started_at,
                    heartbeat_at = EXCLUDED.heartbeat_at
                """)
        }
    }

    public func unregister(owner: String) throws {
        try session.statement { try $0.execute("DELETE FROM dllava.worker WHERE owner = \(owner)") }
    }

    public func workers() throws -> [WorkerRecord] {
        try session.statement { statements in
            try statements.rows("""
                SELECT owner, host, boot_id, pid, process_start, lease_ms, started_at, heartbeat_at FROM dllava.worker ORDER BY owner
                """).map { row in
                let (owner, host, bootID, pid, processStart, lease, started, heartbeat) =
                    try row.decode((String, String, String, Int32, String, Int64, Int64, Int64).self)
                return WorkerRecord(owner: owner, host: host, bootID: bootID, pid: pid, processStart: processStart,
                                    leaseMilliseconds: lease, startedAt: started, heartbeatAt: heartbeat)
            }
        }
    }

    public func runningLeases(ownedBy owners: [String]) throws -> [RunningLease] {
        try session.statement { statements in
            try statements.rows("""
                SELECT id, lease_owner, lease_expires_at FROM dllava.job WHERE state = 'running' AND lease_owner = ANY(\(owners)) ORDER BY id
                """).map { row in
                let (id, owner, expiry) = try row.decode((Int64, String, Int64).self)
                return RunningLease(id: id, owner: owner, expiresAt: expiry)
            }
        }
    }

    public func reclaimJobs(ofDeadWorker owner: String, reason: String) throws -> Int {
        let now = clock.now()
        return try session.transaction { statements in
            let reclaimed = try statements.rows("""
                SELECT dllava.end_dead_leases(\(now), \(retryPolicy.deathLimit)::integer, NULL, \(owner), 'the worker %W died', \(" (\(reason))"))
                """).first?.decode(Int.self) ?? 0
            try statements.execute("DELETE FROM dllava.worker WHERE owner = \(owner)")
            return reclaimed
        }
    }

    // MARK: Copy

    public func highestJobID() throws -> Int64 {
        try session.statement { statements in
            let (last, called, highest) = try statements.rows("""
                SELECT last_value, is_called, (SELECT COALESCE(MAX(id), 0) FROM dllava.job) FROM dllava.job_id_seq
                """)[0].decode((Int64, Bool, Int64).self)
            return max(called ? last : 0, highest)
        }
    }

    public func adoptIdentity(_ identity: String, highestID: Int64) throws {
        try session.transaction { statements in
            try statements.execute("UPDATE dllava.queue SET uuid = \(identity) WHERE singleton = 1")
            if highestID > 0 {
                try statements.execute("SELECT setval('dllava.job_id_seq', GREATEST(\(highestID), (SELECT last_value FROM dllava.job_id_seq)))")
            }
        }
    }

    public func insertCopies(of jobs: [Job]) throws {
        try session.transaction { statements in
            for job in jobs {
                let timings = try job.timings.map { String(decoding: try JSONEncoder().encode($0), as: UTF8.self) }
                try statements.execute("""
                    INSERT INTO dllava.job (id, custom_id, idempotency_key, image_path, image_sha256, prompt, params, priority, state, attempt,
                                            max_attempts, run_at, lease_owner, lease_expires_at, heartbeat_at, cancel_requested, error,
                                            output_path, output_sha256, timings, created_at, updated_at, started_at, finalized_at, snapshot_path,
                                            progress, progress_at_claim, saved_progress, saved_progress_at_claim, deaths_without_progress)
                    VALUES (\(job.id), \(job.customID), \(job.idempotencyKey), \(job.imagePath), \(job.imageSHA256), \(job.prompt),
                            \(job.parameters.canonicalJSON()), \(job.priority), \(job.state.rawValue), \(job.attempt), \(job.maxAttempts),
                            \(job.runAt), \(job.leaseOwner), \(job.leaseExpiresAt), \(job.heartbeatAt), \(job.cancelRequested), \(job.error),
                            \(job.outputPath), \(job.outputSHA256), \(timings), \(job.createdAt), \(job.updatedAt), \(job.startedAt),
                            \(job.finalizedAt), \(job.snapshotPath), \(job.progress), \(job.progressAtClaim),
                            \(job.savedProgress), \(job.savedProgressAtClaim), \(job.deathsWithoutProgress))
                    """)
            }
        }
    }

    /// Waits on `LISTEN dllava_work` (a second connection, opened at the first wait) for a notification that a row
    /// became claimable, or `seconds`. Without a listening connection (the server is away) it just waits `seconds`.
    public func waitForWork(upTo seconds: Double) {
        work.wait(upTo: seconds)
    }

    // MARK: Rows

    /// A `dllava.job` row (`SELECT *`) as a `Job`.
    static func job(_ row: PostgresRow) throws -> Job {
        let columns = row.makeRandomAccess()
        func value<T: PostgresDecodable>(_ name: String, _ type: T.Type = T.self) throws -> T { try columns[name].decode(T.self) }
        let id: Int64 = try value("id")
        let stateName: String = try value("state")
        guard let state = JobState(rawValue: stateName) else { throw JobQueueError.corruptRow(id: id, reason: "unknown state '\(stateName)'") }
        let parameters: JobParameters
        let timings: JobTimings?
        do {
            parameters = try JobParameters.decode(canonicalJSON: try value("params"))
            timings = try (try value("timings", String?.self)).map { try JSONDecoder().decode(JobTimings.self, from: Data($0.utf8)) }
        } catch {
            throw JobQueueError.corruptRow(id: id, reason: "bad JSON in params or timings: \(error)")
        }
        return Job(id: id, customID: try value("custom_id"), idempotencyKey: try value("idempotency_key"), imagePath: try value("image_path"),
                   imageSHA256: try value("image_sha256"), prompt: try value("prompt"), parameters: parameters,
                   priority: try value("priority"), state: state, attempt: try value("attempt"),
                   maxAttempts: try value("max_attempts"), runAt: try value("run_at"), leaseOwner: try value("lease_owner"),
                   leaseExpiresAt: try value("lease_expires_at"), heartbeatAt: try value("heartbeat_at"),
                   cancelRequested: try value("cancel_requested"), error: try value("error"), outputPath: try value("output_path"),
                   outputSHA256: try value("output_sha256"), timings: timings, createdAt: try value("created_at"),
                   updatedAt: try value("updated_at"), startedAt: try value("started_at"), finalizedAt: try value("finalized_at"),
                   snapshotPath: try value("snapshot_path"), progress: try value("progress"), progressAtClaim: try value("progress_at_claim"),
                   savedProgress: try value("saved_progress"), savedProgressAtClaim: try value("saved_progress_at_claim"),
                   deathsWithoutProgress: try value("deaths_without_progress"))
    }
}

extension PostgresQuery.StringInterpolation {
    /// `filter` as a condition over `dllava.job` (never empty); each list travels as one array parameter, so the
    /// statement text is the same for any number of ids.
    mutating func appendInterpolation(filter: JobFilter) {
        appendLiteral("(")
        appendInterpolation(filter.ids)
        appendLiteral("::bigint[] IS NULL OR id = ANY(")
        appendInterpolation(filter.ids)
        appendLiteral(")) AND (")
        appendInterpolation(filter.customIDs)
        appendLiteral("::text[] IS NULL OR custom_id = ANY(")
        appendInterpolation(filter.customIDs)
        appendLiteral(")) AND (")
        let states = filter.states.map { $0.sorted().map(\.rawValue) }
        appendInterpolation(states)
        appendLiteral("::text[] IS NULL OR state = ANY(")
        appendInterpolation(states)
        appendLiteral("))")
    }
}

/// The idle workers' wake-up: a connection that has run `LISTEN dllava_work`, and a flag its notifications set.
final class WorkListener: @unchecked Sendable {
    let address: PostgresAddress
    private let condition = NSCondition()
    private var pending = false
    /// Guards `connection` (a wait may come from more than one thread).
    private let connectionLock = NSLock()
    private var connection: PostgresConnection?
    private let logger: Logger = {
        var logger = Logger(label: "dllava.postgres.listen")
        logger.logLevel = .critical
        return logger
    }()

    init(address: PostgresAddress) { self.address = address }

    deinit { try? connection?.close().wait() }

    func wait(upTo seconds: Double) {
        let deadline = Date().addingTimeInterval(seconds)
        if !listening() {
            Thread.sleep(until: deadline)
            return
        }
        condition.lock()
        while !pending && condition.wait(until: deadline) {}
        pending = false
        condition.unlock()
    }

    /// Opens the listening connection when there is none (or it was lost); false when the server cannot be reached.
    private func listening() -> Bool {
        connectionLock.withLock { openIfNeeded() }
    }

    private func openIfNeeded() -> Bool {
        if let connection, !connection.isClosed { return true }
        do {
            let connection = try PostgresSession.connect(address, id: 0, logger: logger)
            connection.addListener(channel: PostgresSchema.workChannel) { [weak self] _, _ in self?.signal() }
            _ = try connection.query("LISTEN \(unescaped: PostgresSchema.workChannel)", logger: logger).wait()
            self.connection = connection
            // A row may have become claimable while no one listened.
            signal()
            return true
        } catch {
            return false
        }
    }

    private func signal() {
        condition.lock()
        pending = true
        condition.signal()
        condition.unlock()
    }
}
