import Foundation
import GRDB

extension JobFilter {
    /// A WHERE fragment (never empty) and its arguments. Lists travel as one JSON array argument so the
    /// statement text does not depend on how many ids there are.
    func sql() -> (String, StatementArguments) {
        var conditions = ["1"]
        var arguments = StatementArguments()
        if let ids {
            conditions.append("id IN (SELECT value FROM json_each(?))")
            arguments += [Self.jsonArray(ids.map { "\($0)" })]
        }
        if let customIDs {
            conditions.append("custom_id IN (SELECT value FROM json_each(?))")
            arguments += [Self.jsonArray(customIDs.map(Self.jsonString))]
        }
        if let states {
            conditions.append("state IN (SELECT value FROM json_each(?))")
            arguments += [Self.jsonArray(states.sorted().map { Self.jsonString($0.rawValue) })]
        }
        return (conditions.joined(separator: " AND "), arguments)
    }

    static func jsonArray(_ elements: [String]) -> String { "[" + elements.joined(separator: ",") + "]" }

    static func jsonString(_ text: String) -> String {
        String(decoding: try! JSONEncoder().encode(text), as: UTF8.self)
    }
}

/// The queue contract on one SQLite database in WAL mode, shared by any number of processes on one machine.
///
/// Every operation is one short write transaction (bulk operations are split into chunks), and every connection
/// waits up to `busyTimeout` for another process's transaction. Idle workers poll (SQLite has no way to wake a
/// waiting process).
public final class SQLiteJobQueue: JobQueue {
    public let path: String
    public let clock: QueueClock
    public let retryPolicy: RetryPolicy
    /// The queue's identity: a lowercase UUID created once with the queue (migration v2) and never changed. Result and
    /// snapshot files are named under it, so neither a second queue sharing an output folder nor a restored copy of
    /// another queue's database can write or read this queue's files by job id alone.
    public let identity: String
    public let snapshotSecret: Data
    /// None: an SQLite queue's results and snapshots are files under the worker's `--out` (`DirectoryArtifactStore`),
    /// whose paths its rows record.
    public var storedArtifacts: ArtifactStore? { nil }
    let pool: DatabasePool

    /// Rows a bulk operation changes per write transaction.
    static let chunkSize = jobQueueChunkSize

    public var location: String { path }

    /// When a commit reaches the disk. Both survive a killed process (WAL); they differ on power loss.
    public enum Durability: String, Sendable {
        /// fsync on every commit: a reported enqueue or completion survives power loss. The default.
        case full
        /// fsync at checkpoints only (SQLite's advice for WAL): the last commits may roll back on power loss,
        /// never corrupting the database. A lost completion re-runs the job into a new per-attempt file.
        case normal
    }

    /// How a command opens the queue.
    public enum Access: Sendable {
        /// `init`: create the file when missing and apply every migration. An existing database must be empty or
        /// a dllava queue: the schema is never written into someone else's database.
        case create
        /// Workers and operators that change jobs: the file must already be a dllava queue (else
        /// `JobQueueError.notAQueue`, with nothing written); migrations it lacks are applied.
        case readWrite
        /// `status`, `list`, `show`, `export`: opened read-only, never written (a read-only file or a file on a
        /// read-only mount works); a queue that lacks migrations is refused (`olderSchema`) rather than upgraded.
        case readOnly
    }

    /// Opens the queue at `path`. Without `create`, a missing file is an error (`JobQueueError.noDatabase`); a
    /// database that is not a dllava queue is refused before anything is written to it (`notAQueue`); a database
    /// with migrations this build does not know is refused (`newerSchema`).
    public convenience init(path: String, create: Bool = false, busyTimeout: TimeInterval = 10, durability: Durability = .full,
                            clock: QueueClock = .system, retryPolicy: RetryPolicy = RetryPolicy()) throws {
        try self.init(path: path, access: create ? .create : .readWrite, busyTimeout: busyTimeout, durability: durability,
                      clock: clock, retryPolicy: retryPolicy)
    }

    public init(path: String, access: Access, busyTimeout: TimeInterval = 10, durability: Durability = .full,
                clock: QueueClock = .system, retryPolicy: RetryPolicy = RetryPolicy()) throws {
        do {
            let exists = FileManager.default.fileExists(atPath: path)
            if access != .create && !exists { throw JobQueueError.noDatabase(path: path) }
            if exists { try Self.checkIsQueue(path: path, allowEmpty: access == .create, busyTimeout: busyTimeout) }
            var configuration = Configuration()
            configuration.busyMode = .timeout(busyTimeout)
            configuration.label = "dllava-queue"
            configuration.readonly = access == .readOnly
            pool = try DatabasePool(path: access == .readOnly ? Self.readablePath(path) : path, configuration: configuration)
            if access != .readOnly {
                // GRDB sets NORMAL when it turns WAL on; only the one writer connection commits, so setting it there suffices.
                try pool.writeWithoutTransaction { try $0.execute(sql: "PRAGMA synchronous = \(durability == .full ? "FULL" : "NORMAL")") }
            }
            self.path = path
            self.clock = clock
            self.retryPolicy = retryPolicy
            let migrator = Schema.migrator
            let (superseded, complete) = try pool.read { db in
                (try migrator.hasBeenSuperseded(db), try migrator.hasCompletedMigrations(db))
            }
            if superseded { throw JobQueueError.newerSchema(path: path) }
            if !complete {
                if access == .readOnly { throw JobQueueError.olderSchema(path: path) }
                // Only a database that lacks migrations takes the write lock on opening; readers (status) never wait.
                try migrator.migrate(pool)
            }
            identity = try pool.read { try String.fetchOne($0, sql: "SELECT uuid FROM queue WHERE singleton = 1") } ?? ""
            if identity.isEmpty { throw JobQueueError.corruptQueue(path: path, reason: "it has no queue identity") }
            snapshotSecret = try pool.read { try Data.fetchOne($0, sql: "SELECT secret FROM snapshot_secret WHERE singleton = 1") } ?? Data()
            if snapshotSecret.count != 32 { throw JobQueueError.corruptQueue(path: path, reason: "it has no snapshot secret") }
        } catch let error as DatabaseError {
            throw JobQueueError(error, path: path)
        }
    }

    /// Runs a read on the pool, turning SQLite's errors into `JobQueueError.database`, so callers handle one error type.
    func read<T>(_ body: (Database) throws -> T) throws -> T {
        do { return try pool.read(body) } catch let error as DatabaseError { throw JobQueueError(error, path: path) }
    }

    /// Runs a write transaction on the pool, turning SQLite's errors into `JobQueueError.database`.
    func write<T>(_ body: (Database) throws -> T) throws -> T {
        do { return try pool.write(body) } catch let error as DatabaseError { throw JobQueueError(error, path: path) }
    }

    /// The name to open `path` read-only by. SQLite reads a WAL database through its `-shm` file, which it creates
    /// beside the database when missing; on a read-only disk without one it cannot, so there the file is opened as
    /// an immutable URI (`file:...?immutable=1`, Debian's SQLite takes URIs): what the last checkpoint wrote, which on
    /// a disk nobody can write to is the whole queue.
    static func readablePath(_ path: String) -> String {
        let absolute = URL(fileURLWithPath: path).standardizedFileURL.path
        let directory = (absolute as NSString).deletingLastPathComponent
        if access(directory, W_OK) == 0 || FileManager.default.fileExists(atPath: absolute + "-shm") { return path }
        var allowed = CharacterSet.urlPathAllowed
        allowed.remove(charactersIn: "?#%")
        return "file:" + (absolute.addingPercentEncoding(withAllowedCharacters: allowed) ?? absolute) + "?immutable=1"
    }

    /// Refuses, through a read-only connection that changes nothing, a file that is not a dllava queue: not SQLite
    /// at all, or an SQLite database without the queue's migration record and job table (`allowEmpty`: a database
    /// with no tables at all, such as a 0-byte file, may become a queue at `init`).
    static func checkIsQueue(path: String, allowEmpty: Bool, busyTimeout: TimeInterval) throws {
        var configuration = Configuration()
        configuration.readonly = true
        configuration.busyMode = .timeout(busyTimeout)
        let tables: Set<String>
        do {
            let database = try DatabaseQueue(path: readablePath(path), configuration: configuration)
            tables = Set(try database.read { try String.fetchAll($0, sql: "SELECT name FROM sqlite_master WHERE type = 'table'") })
            try database.close()
        } catch let error as DatabaseError where [.SQLITE_NOTADB, .SQLITE_CORRUPT].contains(error.resultCode) {
            throw JobQueueError.notAQueue(path: path, reason: "it is not an SQLite database")
        }
        if tables.isEmpty && allowEmpty { return }
        guard tables.contains("grdb_migrations") && tables.contains("job") else {
            throw JobQueueError.notAQueue(path: path, reason: tables.isEmpty ? "it is an empty database" : "it has no job table")
        }
    }

    public func appliedMigrations() throws -> [String] {
        try read { try Schema.migrator.appliedMigrations($0) }
    }

    // MARK: Enqueue

    @discardableResult
    public func enqueue(_ jobs: [NewJob]) throws -> EnqueueResult {
        try NewJob.validate(jobs)
        var result = EnqueueResult()
        // Jobs of one manifest mostly share their parameters: encode each distinct set once.
        var canonical: [JobParameters: String] = [:]
        var start = 0
        while start < jobs.count {
            let chunk = jobs[start ..< min(start + Self.chunkSize, jobs.count)]
            let now = clock.now()
            try write { db in
                let insert = try db.cachedStatement(sql: """
                    INSERT INTO job (custom_id, idempotency_key, image_path, image_sha256, prompt, params, priority,
                                     state, attempt, max_attempts, run_at, created_at, updated_at)
                    VALUES (?, ?, ?, ?, ?, ?, ?, 'available', 0, ?, ?, ?, ?)
                    ON CONFLICT DO NOTHING
                    RETURNING id
                    """)
                let existing = try db.cachedStatement(sql: "SELECT id, image_sha256, prompt, params FROM job WHERE idempotency_key = ?")
                for (index, job) in zip(chunk.indices, chunk) {
                    let params = canonical[job.parameters] ?? {
                        let json = job.parameters.canonicalJSON()
                        canonical[job.parameters] = json
                        return json
                    }()
                    let key = job.customID.map { "custom_id:" + $0 }
                        ?? NewJob.contentKey(imageSHA256: job.imageSHA256, prompt: job.prompt, canonicalParameters: params)
                    let arguments: StatementArguments = [
                        job.customID, key, job.imagePath, job.imageSHA256, job.prompt, params,
                        job.priority, job.maxAttempts, job.runAt ?? now, now, now,
                    ]
                    if let id = try Int64.fetchOne(insert, arguments: arguments) {
                        result.inserted.append(id)
                    } else if let row = try Row.fetchOne(existing, arguments: [key]) {
                        result.recordExisting(index: index, existingID: row["id"],
                                              sameContent: row["image_sha256"] == job.imageSHA256 && row["prompt"] == job.prompt
                                                  && row["params"] == params)
                    } else {
                        // ON CONFLICT matched the custom_id's uniqueness under a different key: impossible while
                        // the key is derived from the custom id, so the row was written by something else.
                        throw JobQueueError.invalidJob(reason: "custom_id \(job.customID ?? "") conflicts with an existing row")
                    }
                }
            }
            start += chunk.count
        }
        return result
    }

    // MARK: Workers

    /// Claims up to `limit` jobs for `owner`, in the order priority, run_at, id with the jobs about one image
    /// together (`ClaimOrder`), and leases them until `now + leaseDuration` milliseconds. First rescues rows whose
    /// lease expired (see `rescueExpiredLeases`). One write transaction: no job is ever handed to two workers.
    public func claim(owner: String, limit: Int, leaseDuration: Int64) throws -> [Job] {
        precondition(limit >= 1 && leaseDuration >= 1, "claim needs limit >= 1 and a positive lease")
        let now = clock.now()
        let rows = try write { db in
            _ = try Self.rescueExpiredLeases(db, now: now, deathLimit: retryPolicy.deathLimit)
            let candidates = try Row.fetchAll(db.cachedStatement(sql: Self.claimCandidatesSQL),
                                              arguments: [now, ClaimOrder.lookahead(limit)]).map {
                ClaimOrder.Candidate(id: $0["id"], priority: $0["priority"], imageSHA256: $0["image_sha256"])
            }
            let chosen = ClaimOrder.choose(candidates, limit: limit)
            return try Job.fetchAll(db.cachedStatement(sql: Self.claimSQL),
                                    arguments: [owner, now + leaseDuration, now, now, now, JobFilter.jsonArray(chosen.map { "\($0)" })])
        }
        // RETURNING gives rows in no promised order.
        return rows.sorted { ($0.priority, $0.runAt, $0.id) < ($1.priority, $1.runAt, $1.id) }
    }

    /// Puts running rows whose lease expired back in the queue: `cancelled` when a cancel was requested,
    /// `failed` when the attempt that expired was the last, else `retryable` at once (the worker died; the
    /// job did not fail). Returns how many rows were rescued. `claim` calls this itself.
    @discardableResult
    public func rescueExpiredLeases() throws -> Int {
        let now = clock.now()
        return try write { try Self.rescueExpiredLeases($0, now: now, deathLimit: retryPolicy.deathLimit) }
    }

    /// The claimable jobs in claim order, as many as the claim looks ahead. `INDEXED BY` pins the plan to the
    /// claim-order index: without it SQLite may pick the state index, then sort every claimable row on each claim
    /// (measured: 25 claims/s at 100k queued jobs, against thousands).
    static let claimCandidatesSQL = """
        SELECT id, priority, image_sha256 FROM job INDEXED BY job_claim_order
        WHERE state IN ('available', 'retryable') AND run_at <= ?
        ORDER BY priority, run_at, id
        LIMIT ?
        """

    /// The claim of the chosen candidates (in the same transaction, so they are still claimable).
    static let claimSQL = """
        UPDATE job
        SET state = 'running', attempt = attempt + 1, progress_at_claim = progress, saved_progress_at_claim = saved_progress,
            lease_owner = ?, lease_expires_at = ?, heartbeat_at = ?, started_at = ?, updated_at = ?
        WHERE id IN (SELECT value FROM json_each(?)) AND state IN ('available', 'retryable')
        RETURNING *
        """

    static func rescueExpiredLeases(_ db: Database, now: Int64, deathLimit: Int) throws -> Int {
        try db.cachedStatement(sql: rescueSQL).execute(arguments: [now, deathLimit])
        return db.changesCount
    }

    /// Lease rescue, pinned to the expiry index (running rows only) for the same reason as `claimCandidatesSQL`. ?1 now,
    /// ?2 the death limit.
    static let rescueSQL = """
        UPDATE job INDEXED BY job_lease_expiry
        SET \(afterWorkerDeath(event: "'the lease of ' || lease_owner || ' expired during attempt ' || attempt"))
        WHERE state = 'running' AND lease_expires_at <= ?1
        """

    /// The SET clause that ends a running row whose worker died (`event` says how, as an SQL text expression, and
    /// `detail`, when not empty, why it was taken for dead), with ?1 now and ?2 the death limit (docs/FORMATS.md,
    /// "Worker deaths and progress"): `cancelled` when a cancel was requested; else, when the job progressed during the
    /// attempt (it got further than ever before, or its stored snapshot did), `retryable` at once with the attempt given back (`max_attempts` + 1)
    /// and its deaths without progress reset; else the death is counted, and the job is `failed` at the death limit
    /// ("suspected of crashing the worker") or when that was its last attempt, `retryable` at once otherwise. Every
    /// expression reads the row as it was, so the conditions agree with each other.
    static func afterWorkerDeath(event: String, detail: String = "''") -> String {
        let progressed = "(progress > progress_at_claim OR saved_progress > saved_progress_at_claim)"
        let suspected = "deaths_without_progress + 1 >= ?2"
        let final = "cancel_requested = 1 OR (NOT \(progressed) AND (\(suspected) OR attempt >= max_attempts))"
        return """
            state = CASE WHEN cancel_requested = 1 THEN 'cancelled' WHEN \(final) THEN 'failed' ELSE 'retryable' END,
                error = CASE WHEN cancel_requested = 1 THEN error
                             WHEN \(progressed) THEN \(event) || ' after progress (reached ' || progress_at_claim || ' to ' || progress
                                                     || ', saved ' || saved_progress_at_claim || ' to ' || saved_progress
                                                     || '): not counted against its attempts' || \(detail)
                             WHEN \(suspected) THEN 'suspected of crashing the worker: present at ' || (deaths_without_progress + 1)
                                                    || ' worker deaths in a row without progress (' || \(event) || ')' || \(detail)
                             ELSE \(event) || ' of ' || max_attempts || \(detail) END,
                max_attempts = CASE WHEN cancel_requested = 0 AND \(progressed) THEN max_attempts + 1 ELSE max_attempts END,
                deaths_without_progress = CASE WHEN \(progressed) THEN 0 ELSE deaths_without_progress + 1 END,
                finalized_at = CASE WHEN \(final) THEN ?1 END,
                run_at = ?1, lease_owner = NULL, lease_expires_at = NULL, updated_at = ?1
            """
    }

    /// Extends the leases of `jobs` that `owner` still holds to `now + leaseDuration`, raises their recorded progress
    /// to what `progress` gives (never lowers it), and says which of them a `cancel` asked to stop. Call it from a
    /// thread that long matrix products cannot starve.
    public func heartbeat(jobs: [Int64], owner: String, leaseDuration: Int64, progress: [Int64: JobProgress]) throws -> HeartbeatResult {
        let now = clock.now()
        let rows = try write { db in
            let rows = try Row.fetchAll(db.cachedStatement(sql: """
                UPDATE job SET lease_expires_at = ?1, heartbeat_at = ?2, updated_at = ?2,
                               progress = max(progress, coalesce(json_extract(?5, '$."' || id || '"[0]'), 0)),
                               saved_progress = max(saved_progress, coalesce(json_extract(?5, '$."' || id || '"[1]'), 0))
                WHERE id IN (SELECT value FROM json_each(?3)) AND state = 'running' AND lease_owner = ?4
                RETURNING id, cancel_requested
                """), arguments: [now + leaseDuration, now, JobFilter.jsonArray(jobs.map { "\($0)" }), owner, progress.jsonObject])
            // The worker registry's beat: how other hosts tell a silent worker.
            try db.cachedStatement(sql: "UPDATE worker SET heartbeat_at = ? WHERE owner = ?").execute(arguments: [now, owner])
            return rows
        }
        var result = HeartbeatResult()
        for row in rows {
            let id: Int64 = row["id"]
            result.extended.insert(id)
            if row["cancel_requested"] as Bool { result.cancelRequested.insert(id) }
        }
        result.lost = Set(jobs).subtracting(result.extended)
        return result
    }

    /// The jobs among `jobs` whose cancellation was requested (a read; cheap enough for every decode step).
    public func cancelRequested(among jobs: [Int64]) throws -> Set<Int64> {
        try read { db in
            Set(try Int64.fetchAll(db, sql: """
                SELECT id FROM job WHERE id IN (SELECT value FROM json_each(?)) AND state = 'running' AND cancel_requested = 1
                """, arguments: [JobFilter.jsonArray(jobs.map { "\($0)" })]))
        }
    }

    /// Records success. Accepted only while the job is `running` under `owner` with this `attempt`; returns
    /// false otherwise (the lease was rescued and the job handed on: this late result must be discarded).
    /// A job whose cancel was requested but which finished anyway is recorded as succeeded.
    public func complete(job id: Int64, attempt: Int, owner: String, output: JobOutput) throws -> Bool {
        let now = clock.now()
        let timings = try output.timings.map { String(decoding: try JSONEncoder().encode($0), as: UTF8.self) }
        return try write { db in
            try db.cachedStatement(sql: """
                UPDATE job
                SET state = 'succeeded', output_path = ?, output_sha256 = ?, timings = ?, error = NULL,
                    lease_owner = NULL, lease_expires_at = NULL, cancel_requested = 0, finalized_at = ?, updated_at = ?
                WHERE id = ? AND state = 'running' AND attempt = ? AND lease_owner = ?
                """).execute(arguments: [output.path, output.sha256, timings, now, now, id, attempt, owner])
            if db.changesCount == 1 { return true }
            // The same result again (a retried completion) counts as done, as on PostgreSQL.
            return try Bool.fetchOne(db.cachedStatement(sql: """
                SELECT EXISTS (SELECT 1 FROM job WHERE id = ? AND state = 'succeeded' AND attempt = ? AND output_path IS ? AND output_sha256 = ?)
                """), arguments: [id, attempt, output.path, output.sha256]) ?? false
        }
    }

    /// Records a failure, fenced like `complete`; returns the job's new state, or nil when refused.
    /// `permanent` (an undecodable image, a prompt longer than the context) goes to `failed` at once. Otherwise
    /// the job becomes `retryable` after `retryPolicy.delay(afterAttempt: attempt)`, or `failed` when this was its
    /// last attempt, or `cancelled` when a cancel was requested meanwhile.
    @discardableResult
    public func fail(job id: Int64, attempt: Int, owner: String, error reason: String, permanent: Bool) throws -> JobState? {
        let now = clock.now()
        let retryAt = now + retryPolicy.delay(afterAttempt: attempt)
        return try write { db in
            let state = try String.fetchOne(db.cachedStatement(sql: """
                UPDATE job
                SET state = CASE WHEN ?1 THEN 'failed' WHEN cancel_requested = 1 THEN 'cancelled'
                                 WHEN attempt >= max_attempts THEN 'failed' ELSE 'retryable' END,
                    run_at = CASE WHEN ?1 OR cancel_requested = 1 OR attempt >= max_attempts THEN run_at ELSE ?2 END,
                    finalized_at = CASE WHEN ?1 OR cancel_requested = 1 OR attempt >= max_attempts THEN ?3 END,
                    error = ?4, lease_owner = NULL, lease_expires_at = NULL, updated_at = ?3
                WHERE id = ?5 AND state = 'running' AND attempt = ?6 AND lease_owner = ?7
                RETURNING state
                """), arguments: [permanent, retryAt, now, reason, id, attempt, owner])
            return state.flatMap(JobState.init(rawValue:))
        }
    }

    /// Finalises a running job as `cancelled` after its worker saw `cancel_requested`; fenced like `complete`.
    public func acknowledgeCancel(job id: Int64, attempt: Int, owner: String) throws -> Bool {
        let now = clock.now()
        return try write { db in
            try db.cachedStatement(sql: """
                UPDATE job SET state = 'cancelled', lease_owner = NULL, lease_expires_at = NULL, finalized_at = ?, updated_at = ?
                WHERE id = ? AND state = 'running' AND attempt = ? AND lease_owner = ?
                """).execute(arguments: [now, now, id, attempt, owner])
            return db.changesCount == 1
        }
    }

    /// Hands `owner`'s running jobs among `jobs` back to the queue without counting the attempt (graceful
    /// shutdown): they become `available` at once with one more try allowed, or `cancelled` if a cancel was
    /// requested. Returns how many rows were released.
    @discardableResult
    public func release(jobs: [Int64], owner: String) throws -> Int {
        let now = clock.now()
        return try write { db in
            try db.cachedStatement(sql: """
                UPDATE job
                SET state = CASE WHEN cancel_requested = 1 THEN 'cancelled' ELSE 'available' END,
                    finalized_at = CASE WHEN cancel_requested = 1 THEN ?1 END,
                    max_attempts = max_attempts + 1, run_at = ?1, lease_owner = NULL, lease_expires_at = NULL, updated_at = ?1
                WHERE id IN (SELECT value FROM json_each(?2)) AND state = 'running' AND lease_owner = ?3
                """).execute(arguments: [now, JobFilter.jsonArray(jobs.map { "\($0)" }), owner])
            return db.changesCount
        }
    }

    // MARK: Operators

    /// Cancels the jobs `filter` selects: queued ones (available, retryable) become `cancelled` at once;
    /// running ones are flagged and their worker finalises them at its next decode step. Final rows are left
    /// alone.
    public func cancel(_ filter: JobFilter) throws -> CancelResult {
        let (condition, arguments) = filter.sql()
        var result = CancelResult()
        result.cancelled = try chunked { db, now in
            try db.execute(sql: """
                UPDATE job SET state = 'cancelled', finalized_at = ?, updated_at = ?
                WHERE id IN (SELECT id FROM job WHERE \(condition) AND state IN ('available', 'retryable') LIMIT ?)
                """, arguments: [now, now] + arguments + [Self.chunkSize])
        }
        result.requested = try chunked { db, now in
            try db.execute(sql: """
                UPDATE job SET cancel_requested = 1, updated_at = ?
                WHERE id IN (SELECT id FROM job WHERE \(condition) AND state = 'running' AND cancel_requested = 0 LIMIT ?)
                """, arguments: [now] + arguments + [Self.chunkSize])
        }
        return result
    }

    /// Puts the `failed` and `cancelled` jobs `filter` selects back to `available` (run at once, error and
    /// output cleared) with `attempts` fresh tries: `max_attempts` becomes `attempt + attempts`, since
    /// `attempt` never goes back. Other states are left alone. Returns how many rows were requeued.
    public func retry(_ filter: JobFilter, attempts: Int) throws -> Int {
        precondition(attempts >= 1, "retry grants at least one attempt")
        let (condition, arguments) = filter.sql()
        return try chunked { db, now in
            try db.execute(sql: """
                UPDATE job
                SET state = 'available', max_attempts = attempt + ?, run_at = ?, finalized_at = NULL, cancel_requested = 0,
                    deaths_without_progress = 0, error = NULL, output_path = NULL, output_sha256 = NULL, timings = NULL, updated_at = ?
                WHERE id IN (SELECT id FROM job WHERE \(condition) AND state IN ('failed', 'cancelled') LIMIT ?)
                """, arguments: [attempts, now, now] + arguments + [Self.chunkSize])
        }
    }

    /// Deletes final rows (succeeded, failed, cancelled) finalised more than `olderThan` milliseconds ago.
    /// Returns the output and snapshot paths the deleted rows recorded (files are not touched here). Their ids are
    /// never handed out again (AUTOINCREMENT, migration v2).
    public func prune(olderThan age: Int64) throws -> PruneResult {
        let cutoff = clock.now() - age
        var result = PruneResult()
        result.deleted = try chunked { db, _ in
            let rows = try Row.fetchAll(db, sql: """
                DELETE FROM job WHERE id IN (SELECT id FROM job
                    WHERE state IN ('succeeded', 'failed', 'cancelled') AND finalized_at < ? LIMIT ?)
                RETURNING output_path, snapshot_path
                """, arguments: [cutoff, Self.chunkSize])
            for row in rows {
                if let path: String = row["output_path"] { result.outputPaths.append(path) }
                if let path: String = row["snapshot_path"] { result.snapshotPaths.append(path) }
            }
        }
        return result
    }

    /// Records where `job`'s KV snapshot is written, so `prune` can find it. A worker calls it before the job's first
    /// snapshot of an attempt; recording a path whose file is never written (or is deleted later) is harmless.
    public func recordSnapshotPath(job id: Int64, path: String) throws {
        let now = clock.now()
        try write { db in
            try db.cachedStatement(sql: "UPDATE job SET snapshot_path = ?, updated_at = ? WHERE id = ? AND snapshot_path IS NOT ?")
                .execute(arguments: [path, now, id, path])
        }
    }

    /// Runs `body` in write transactions of at most `chunkSize` changed rows until one changes fewer.
    private func chunked(_ body: (Database, Int64) throws -> Void) throws -> Int {
        var total = 0
        while true {
            let now = clock.now()
            let changed = try write { db in
                try body(db, now)
                return db.changesCount
            }
            total += changed
            if changed < Self.chunkSize { return total }
        }
    }

    // MARK: Reading

    public func job(id: Int64) throws -> Job? {
        try read { try Job.fetchOne($0, sql: "SELECT * FROM job WHERE id = ?", arguments: [id]) }
    }

    public func job(customID: String) throws -> Job? {
        try read { try Job.fetchOne($0, sql: "SELECT * FROM job WHERE custom_id = ?", arguments: [customID]) }
    }

    /// Jobs `filter` selects, by id, starting after `afterID`.
    public func list(_ filter: JobFilter, limit: Int, afterID: Int64) throws -> [Job] {
        let (condition, arguments) = filter.sql()
        return try read { db in
            try Job.fetchAll(db, sql: "SELECT * FROM job WHERE \(condition) AND id > ? ORDER BY id LIMIT ?",
                             arguments: arguments + [afterID, limit])
        }
    }

    /// Calls `body` with every job `filter` selects, by id, from one consistent snapshot, without holding
    /// them all in memory.
    public func forEach(_ filter: JobFilter, _ body: (Job) throws -> Void) throws {
        let (condition, arguments) = filter.sql()
        try read { db in
            let jobs = try Job.fetchCursor(db, sql: "SELECT * FROM job WHERE \(condition) ORDER BY id", arguments: arguments)
            while let job = try jobs.next() { try body(job) }
        }
    }

    public func counts() throws -> [JobState: Int] {
        try read { try Self.counts($0) }
    }

    static func counts(_ db: Database) throws -> [JobState: Int] {
        var counts = Dictionary(uniqueKeysWithValues: JobState.allCases.map { ($0, 0) })
        for row in try Row.fetchAll(db, sql: "SELECT state, COUNT(*) AS n FROM job GROUP BY state") {
            if let state = JobState(rawValue: row["state"]) { counts[state] = row["n"] }
        }
        return counts
    }

    /// Counts, and throughput over the last `window` milliseconds: jobs that succeeded in the window divided by
    /// the time since the later of the window's start and the earliest start of those jobs (so a run that began
    /// ten minutes ago is not averaged over the whole hour).
    public func statistics(window: Int64) throws -> QueueStatistics {
        let now = clock.now()
        return try read { db in
            let counts = try Self.counts(db)
            let row = try Row.fetchOne(db, sql: """
                SELECT COUNT(*) AS n, MIN(started_at) AS first FROM job WHERE state = 'succeeded' AND finalized_at >= ?
                """, arguments: [now - window])!
            return QueueStatistics(counts: counts, windowMs: window, succeededInWindow: row["n"], firstStart: row["first"], now: now)
        }
    }

    /// SQLite cannot wake another process: an idle worker polls.
    public func waitForWork(upTo seconds: Double) {
        Thread.sleep(forTimeInterval: seconds)
    }

    // MARK: Copy

    public func highestJobID() throws -> Int64 {
        try read { db in
            max(try Int64.fetchOne(db, sql: "SELECT seq FROM sqlite_sequence WHERE name = 'job'") ?? 0,
                try Int64.fetchOne(db, sql: "SELECT MAX(id) FROM job") ?? 0)
        }
    }

    public func adoptIdentity(_ identity: String, highestID: Int64) throws {
        try write { db in
            try db.execute(sql: "UPDATE queue SET uuid = ? WHERE singleton = 1", arguments: [identity])
            try db.execute(sql: "UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = 'job'", arguments: [highestID])
            if db.changesCount == 0 {
                try db.execute(sql: "INSERT INTO sqlite_sequence (name, seq) VALUES ('job', ?)", arguments: [highestID])
            }
        }
    }

    public func insertCopies(of jobs: [Job]) throws {
        try write { db in
            let insert = try db.cachedStatement(sql: """
                INSERT INTO job (id, custom_id, idempotency_key, image_path, image_sha256, prompt, params, priority, state, attempt,
                                 max_attempts, run_at, lease_owner, lease_expires_at, heartbeat_at, cancel_requested, error, output_path,
                                 output_sha256, timings, created_at, updated_at, started_at, finalized_at, snapshot_path, progress,
                                 progress_at_claim, saved_progress, saved_progress_at_claim, deaths_without_progress)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                """)
            for job in jobs {
                let timings = try job.timings.map { String(decoding: try JSONEncoder().encode($0), as: UTF8.self) }
                try insert.execute(arguments: [
                    job.id, job.customID, job.idempotencyKey, job.imagePath, job.imageSHA256, job.prompt, job.parameters.canonicalJSON(),
                    job.priority, job.state.rawValue, job.attempt, job.maxAttempts, job.runAt, job.leaseOwner, job.leaseExpiresAt,
                    job.heartbeatAt, job.cancelRequested, job.error, job.outputPath, job.outputSHA256, timings, job.createdAt,
                    job.updatedAt, job.startedAt, job.finalizedAt, job.snapshotPath, job.progress, job.progressAtClaim,
                    job.savedProgress, job.savedProgressAtClaim, job.deathsWithoutProgress,
                ])
            }
        }
    }
}
