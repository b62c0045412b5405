import Foundation
import GRDB

/// The queue's migrations. Each one is shipped once and never edited: a change to the schema is a new
/// migration appended here. A database that holds a migration this build does not know was made by a
/// newer dllava, and `JobQueue` refuses to open it.
enum Schema {
    static var migrator: DatabaseMigrator {
        var migrator = DatabaseMigrator()
        migrator.registerMigration("v1-job") { db in
            // Times are Unix milliseconds computed in Swift (Debian's SQLite 3.40 lacks 'subsec').
            // JSON columns: params (JobParameters, canonical), timings (JobTimings).
            try db.execute(sql: """
                CREATE TABLE job (
                    id               INTEGER PRIMARY KEY,
                    custom_id        TEXT UNIQUE,
                    idempotency_key  TEXT NOT NULL UNIQUE,
                    image_path       TEXT NOT NULL,
                    image_sha256     TEXT NOT NULL,
                    prompt           TEXT NOT NULL,
                    params           TEXT NOT NULL,
                    priority         INTEGER NOT NULL DEFAULT 0,
                    state            TEXT NOT NULL DEFAULT 'available'
                                     CHECK (state IN ('available', 'running', 'retryable', 'succeeded', 'failed', 'cancelled')),
                    attempt          INTEGER NOT NULL DEFAULT 0 CHECK (attempt >= 0),
                    max_attempts     INTEGER NOT NULL CHECK (max_attempts >= 1),
                    run_at           INTEGER NOT NULL,
                    lease_owner      TEXT,
                    lease_expires_at INTEGER,
                    heartbeat_at     INTEGER,
                    cancel_requested INTEGER NOT NULL DEFAULT 0 CHECK (cancel_requested IN (0, 1)),
                    error            TEXT,
                    output_path      TEXT,
                    output_sha256    TEXT,
                    timings          TEXT,
                    created_at       INTEGER NOT NULL,
                    updated_at       INTEGER NOT NULL,
                    started_at       INTEGER,
                    finalized_at     INTEGER,
                    CHECK ((state IN ('succeeded', 'failed', 'cancelled')) = (finalized_at IS NOT NULL)),
                    CHECK ((state = 'running') = (lease_owner IS NOT NULL AND lease_expires_at IS NOT NULL))
                ) STRICT
                """)
            // The claim query's order, over claimable rows only.
            try db.execute(sql: """
                CREATE INDEX job_claim_order ON job (priority, run_at, id) WHERE state IN ('available', 'retryable')
                """)
            // Lease rescue scans running rows by expiry.
            try db.execute(sql: "CREATE INDEX job_lease_expiry ON job (lease_expires_at) WHERE state = 'running'")
            // counts(), list --state, throughput over succeeded rows, prune over final rows.
            try db.execute(sql: "CREATE INDEX job_state_finalized ON job (state, finalized_at)")
        }
        registerIdentityMigration(&migrator)
        registerWorkerMigration(&migrator)
        registerProgressMigration(&migrator)
        registerSnapshotSecretMigration(&migrator)
        return migrator
    }

    /// v4: a worker's death is not its jobs' failure. Workers record each running job's progress (`JobProgress`: how
    /// far it got, `progress`, and how far its stored snapshot holds, `saved_progress`; both only ever raised), a claim
    /// notes both (`*_at_claim`), and a rescue compares: a job that progressed during the attempt its worker died in is
    /// not charged that attempt; one that did not is, and counts the death in `deaths_without_progress` (reset by
    /// progress), failing as suspected of crashing the worker at `RetryPolicy.deathLimit` such deaths in a row.
    static func registerProgressMigration(_ migrator: inout DatabaseMigrator) {
        migrator.registerMigration("v4-job-progress") { db in
            try db.execute(sql: "ALTER TABLE job ADD COLUMN progress INTEGER NOT NULL DEFAULT 0 CHECK (progress >= 0)")
            try db.execute(sql: "ALTER TABLE job ADD COLUMN progress_at_claim INTEGER NOT NULL DEFAULT 0 CHECK (progress_at_claim >= 0)")
            try db.execute(sql: "ALTER TABLE job ADD COLUMN saved_progress INTEGER NOT NULL DEFAULT 0 CHECK (saved_progress >= 0)")
            try db.execute(sql: """
                ALTER TABLE job ADD COLUMN saved_progress_at_claim INTEGER NOT NULL DEFAULT 0 CHECK (saved_progress_at_claim >= 0)
                """)
            try db.execute(sql: """
                ALTER TABLE job ADD COLUMN deaths_without_progress INTEGER NOT NULL DEFAULT 0 CHECK (deaths_without_progress >= 0)
                """)
        }
    }


    /// v5: the queue's snapshot secret (`JobQueue.snapshotSecret`), 32 bytes from the system's secure random source,
    /// created once and never changed.
    static func registerSnapshotSecretMigration(_ migrator: inout DatabaseMigrator) {
        migrator.registerMigration("v5-snapshot-secret") { db in
            try db.execute(sql: """
                CREATE TABLE snapshot_secret (
                    singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
                    secret    BLOB NOT NULL CHECK (length(secret) = 32)
                ) STRICT
                """)
            try db.execute(sql: "INSERT INTO snapshot_secret (singleton, secret) VALUES (1, ?)", arguments: [newSnapshotSecret()])
        }
    }

    /// 32 bytes from the system's secure random source.
    static func newSnapshotSecret() -> Data {
        var generator = SystemRandomNumberGenerator()
        return Data((0..<32).map { _ in UInt8.random(in: 0...255, using: &generator) })
    }

    /// v3: the worker registry. Each `run` records who it is (host, boot id, pid and the process's start time, so a
    /// reused pid is not taken for the same process) and when it last beat; a worker on the same host then tells a
    /// dead worker's jobs at once instead of waiting out their lease, and `status` can say whose jobs are orphaned.
    static func registerWorkerMigration(_ migrator: inout DatabaseMigrator) {
        migrator.registerMigration("v3-worker-registry") { db in
            try db.execute(sql: """
                CREATE TABLE worker (
                    owner         TEXT PRIMARY KEY,
                    host          TEXT NOT NULL,
                    boot_id       TEXT NOT NULL,
                    pid           INTEGER NOT NULL,
                    process_start TEXT NOT NULL,
                    lease_ms      INTEGER NOT NULL CHECK (lease_ms > 0),
                    started_at    INTEGER NOT NULL,
                    heartbeat_at  INTEGER NOT NULL
                ) STRICT
                """)
        }
    }

    /// v2: job ids are never reused, and the queue has an identity.
    ///
    /// v1's `id INTEGER PRIMARY KEY` let SQLite hand a pruned job's id to a new job, whose run then found the old job's
    /// snapshot and result file names. SQLite adds AUTOINCREMENT only at CREATE TABLE, so the table is rebuilt: rows
    /// keep their ids, and `sqlite_sequence` starts above the largest one copied. (Ids pruned above that largest one
    /// before this migration may be handed out again; their files carry v1's names, which no v2 run writes or reads.)
    ///
    /// `queue.uuid` is created here once (for a new queue at `init`, for an existing one when it is first opened by
    /// this build) and never changes: result and snapshot files live under `<out>/<uuid>/`, so two queues sharing one
    /// `--out` never write the same name. `job.snapshot_path` records where a job's KV snapshot went, so `prune
    /// --delete-outputs` can delete it without knowing `--out`.
    static func registerIdentityMigration(_ migrator: inout DatabaseMigrator) {
        migrator.registerMigration("v2-job-identity") { db in
            try db.execute(sql: """
                CREATE TABLE queue (
                    singleton  INTEGER PRIMARY KEY CHECK (singleton = 1),
                    uuid       TEXT NOT NULL CHECK (length(uuid) = 36),
                    created_at INTEGER NOT NULL
                ) STRICT
                """)
            try db.execute(sql: "INSERT INTO queue (singleton, uuid, created_at) VALUES (1, ?, ?)",
                           arguments: [UUID().uuidString.lowercased(), Int64(Date().timeIntervalSince1970 * 1000)])
            let columns = """
                id, custom_id, idempotency_key, image_path, image_sha256, prompt, params, priority, state, attempt,
                max_attempts, run_at, lease_owner, lease_expires_at, heartbeat_at, cancel_requested, error, output_path,
                output_sha256, timings, created_at, updated_at, started_at, finalized_at
                """
            try db.execute(sql: """
                CREATE TABLE job_v2 (
                    id               INTEGER PRIMARY KEY AUTOINCREMENT,
                    custom_id        TEXT UNIQUE,
                    idempotency_key  TEXT NOT NULL UNIQUE,
                    image_path       TEXT NOT NULL,
                    image_sha256     TEXT NOT NULL,
                    prompt           TEXT NOT NULL,
                    params           TEXT NOT NULL,
                    priority         INTEGER NOT NULL DEFAULT 0,
                    state            TEXT NOT NULL DEFAULT 'available'
                                     CHECK (state IN ('available', 'running', 'retryable', 'succeeded', 'failed', 'cancelled')),
                    attempt          INTEGER NOT NULL DEFAULT 0 CHECK (attempt >= 0),
                    max_attempts     INTEGER NOT NULL CHECK (max_attempts >= 1),
                    run_at           INTEGER NOT NULL,
                    lease_owner      TEXT,
                    lease_expires_at INTEGER,
                    heartbeat_at     INTEGER,
                    cancel_requested INTEGER NOT NULL DEFAULT 0 CHECK (cancel_requested IN (0, 1)),
                    error            TEXT,
                    output_path      TEXT,
                    output_sha256    TEXT,
                    timings          TEXT,
                    created_at       INTEGER NOT NULL,
                    updated_at       INTEGER NOT NULL,
                    started_at       INTEGER,
                    finalized_at     INTEGER,
                    snapshot_path    TEXT,
                    CHECK ((state IN ('succeeded', 'failed', 'cancelled')) = (finalized_at IS NOT NULL)),
                    CHECK ((state = 'running') = (lease_owner IS NOT NULL AND lease_expires_at IS NOT NULL))
                ) STRICT
                """)
            try db.execute(sql: "INSERT INTO job_v2 (\(columns)) SELECT \(columns) FROM job ORDER BY id")
            try db.execute(sql: "DROP TABLE job")
            try db.execute(sql: "ALTER TABLE job_v2 RENAME TO job")
            // The same indexes as v1 (dropped with the old table), for the same reasons.
            try db.execute(sql: """
                CREATE INDEX job_claim_order ON job (priority, run_at, id) WHERE state IN ('available', 'retryable')
                """)
            try db.execute(sql: "CREATE INDEX job_lease_expiry ON job (lease_expires_at) WHERE state = 'running'")
            try db.execute(sql: "CREATE INDEX job_state_finalized ON job (state, finalized_at)")
        }
    }
}
