import Foundation
import GRDB

/// A `run` process as the worker registry records it (table `worker`, migration v3).
public struct WorkerRecord: Sendable, Hashable {
    /// The lease owner string its claims carry.
    public var owner: String
    public var host: String
    /// `/proc/sys/kernel/random/boot_id`: a worker of an earlier boot of this host is dead.
    public var bootID: String
    public var pid: Int32
    /// The process's start time (`/proc/<pid>/stat` field 22, clock ticks since boot): a live pid with another start
    /// time is another process that reused the pid.
    public var processStart: String
    public var leaseMilliseconds: Int64
    public var startedAt: Int64
    public var heartbeatAt: Int64

    /// This process, as the worker `owner` with leases of `leaseMilliseconds`.
    public static func current(owner: String, leaseMilliseconds: Int64, now: Int64) -> WorkerRecord {
        let pid = getpid()
        return WorkerRecord(owner: owner, host: ProcessInfo.processInfo.hostName, bootID: ProcessLiveness.bootID(),
                            pid: pid, processStart: ProcessLiveness.startTime(of: pid) ?? "", leaseMilliseconds: leaseMilliseconds,
                            startedAt: now, heartbeatAt: now)
    }

    init(row: Row) {
        owner = row["owner"]
        host = row["host"]
        bootID = row["boot_id"]
        pid = row["pid"]
        processStart = row["process_start"]
        leaseMilliseconds = row["lease_ms"]
        startedAt = row["started_at"]
        heartbeatAt = row["heartbeat_at"]
    }

    public init(owner: String, host: String, bootID: String, pid: Int32, processStart: String, leaseMilliseconds: Int64,
                startedAt: Int64, heartbeatAt: Int64) {
        self.owner = owner
        self.host = host
        self.bootID = bootID
        self.pid = pid
        self.processStart = processStart
        self.leaseMilliseconds = leaseMilliseconds
        self.startedAt = startedAt
        self.heartbeatAt = heartbeatAt
    }

    /// What can be said of this worker from here: dead (known only on its own host), silent (another host, and no
    /// heartbeat for half a lease: two of its four heartbeats missed), or alive as far as can be told.
    public func liveness(now: Int64) -> WorkerLiveness {
        // Without /proc (another system) nothing is known of the process: judge it by its heartbeats, as on another host.
        let procKnown = !processStart.isEmpty && !bootID.isEmpty && !ProcessLiveness.bootID().isEmpty
        if procKnown && host == ProcessInfo.processInfo.hostName {
            if bootID != ProcessLiveness.bootID() { return .dead(reason: "its host has restarted since") }
            guard let start = ProcessLiveness.startTime(of: pid) else { return .dead(reason: "process \(pid) is not running") }
            if start != processStart { return .dead(reason: "process \(pid) is not running (the pid now belongs to another process)") }
            return .alive
        }
        if now - heartbeatAt > leaseMilliseconds / 2 { return .silent(since: heartbeatAt) }
        return .alive
    }
}

public enum WorkerLiveness: Sendable, Hashable {
    case alive
    /// On this host, and its process is gone: its jobs can be reclaimed at once.
    case dead(reason: String)
    /// On another host, and it has not beaten for half a lease: its jobs are reclaimed when their leases expire.
    case silent(since: Int64)
}

/// A running job whose worker is gone: who held it, why it is taken for gone, and when it will be claimable.
public struct OrphanedJob: Sendable, Hashable {
    public var id: Int64
    public var owner: String
    public var host: String
    public var liveness: WorkerLiveness
    /// Its lease's expiry (Unix ms): the latest it is reclaimed; a worker on the dead worker's host does it at its next claim.
    public var leaseExpiresAt: Int64
}

/// Process facts from /proc (Linux); elsewhere unknown, and a worker is then never taken for dead by pid.
enum ProcessLiveness {
    static func bootID() -> String {
        (try? String(contentsOfFile: "/proc/sys/kernel/random/boot_id", encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines) ?? ""
    }

    /// Field 22 of `/proc/<pid>/stat`, or nil when no such process runs.
    static func startTime(of pid: Int32) -> String? {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let end = stat.lastIndex(of: ")") else { return nil }
        // Fields after the command name (which may hold spaces) start at field 3.
        let fields = stat[stat.index(after: end)...].split(separator: " ")
        return fields.count > 19 ? String(fields[19]) : nil
    }
}

extension SQLiteJobQueue {
    public func register(_ worker: WorkerRecord) throws {
        try write { db in
            try db.execute(sql: """
                INSERT OR REPLACE INTO worker (owner, host, boot_id, pid, process_start, lease_ms, started_at, heartbeat_at)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                """, arguments: [worker.owner, worker.host, worker.bootID, worker.pid, worker.processStart, worker.leaseMilliseconds,
                                 worker.startedAt, worker.heartbeatAt])
        }
    }

    public func unregister(owner: String) throws {
        try write { try $0.execute(sql: "DELETE FROM worker WHERE owner = ?", arguments: [owner]) }
    }

    public func workers() throws -> [WorkerRecord] {
        try read { db in try Row.fetchAll(db, sql: "SELECT * FROM worker ORDER BY owner").map(WorkerRecord.init(row:)) }
    }

    public func runningLeases(ownedBy owners: [String]) throws -> [RunningLease] {
        try read { db in
            try Row.fetchAll(db, sql: """
                SELECT id, lease_owner, lease_expires_at FROM job
                WHERE state = 'running' AND lease_owner IN (SELECT value FROM json_each(?)) ORDER BY id
                """, arguments: [JobFilter.jsonArray(owners.map(JobFilter.jsonString))]).map { row in
                RunningLease(id: row["id"], owner: row["lease_owner"], expiresAt: row["lease_expires_at"])
            }
        }
    }

    public func reclaimJobs(ofDeadWorker owner: String, reason: String) throws -> Int {
        let now = clock.now()
        return try write { db in
            try db.execute(sql: """
                UPDATE job
                SET \(Self.afterWorkerDeath(event: "'the worker ' || lease_owner || ' died during attempt ' || attempt", detail: "' (' || ?3 || ')'"))
                WHERE state = 'running' AND lease_owner = ?4
                """, arguments: [now, retryPolicy.deathLimit, reason, owner])
            let reclaimed = db.changesCount
            try db.execute(sql: "DELETE FROM worker WHERE owner = ?", arguments: [owner])
            return reclaimed
        }
    }
}
