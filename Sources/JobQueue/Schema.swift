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
        return migrator
    }
}
