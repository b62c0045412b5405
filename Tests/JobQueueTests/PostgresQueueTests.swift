import Artifacts
import BatchDaemon
import CommandLineSupport
import Foundation
import Testing
@testable import JobQueue
@testable import PostgresQueue

/// What only the PostgreSQL queue has: its migrations in schema `dllava`, its URL, LISTEN/NOTIFY, reconnecting.
@Suite("PostgresQueue")
struct PostgresQueueTests {
    @Test func migrationsCreateTheQueueSchemaOnceAndKeepTheIdentity() throws {
        let fixture = try Fixture(.postgres)
        defer { fixture.remove() }
        #expect(try fixture.queue.appliedMigrations() == ["v1-queue", "v2-stored-artifacts", "v3-snapshot-frames", "v4-job-progress", "v5-snapshot-secret", "v6-claim-by-image"])
        let again = try PostgresJobQueue(url: fixture.location)
        #expect(try again.appliedMigrations() == ["v1-queue", "v2-stored-artifacts", "v3-snapshot-frames", "v4-job-progress", "v5-snapshot-secret", "v6-claim-by-image"])
        #expect(again.identity == fixture.queue.identity && UUID(uuidString: again.identity) != nil)
        #expect(again.snapshotSecret == fixture.queue.snapshotSecret && again.snapshotSecret.count == 32)
        let tables = try TestPostgres.shared().psql("SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_tables WHERE schemaname = 'dllava'",
                                                   database: String(fixture.location.split(separator: "/").last!))
        #expect(tables.trimmingCharacters(in: .whitespacesAndNewlines) == "job,migration,queue,result,snapshot,snapshot_chunk,snapshot_secret,worker")
    }

    @Test func aVersion1QueueGainsStoredArtifactsAndStillExportsItsResultFiles() throws {
        let fixture = try Fixture(.postgres)
        defer { fixture.remove() }
        let id = try fixture.queue.enqueue(fixture.jobs(1)).inserted[0]
        let job = try fixture.queue.claim(owner: "w", limit: 1, leaseDuration: 60_000)[0]
        let record = ResultRecord(queueID: fixture.queue.identity, jobID: id, attempt: job.attempt, customID: job.customID, text: "three shapes",
                                  tokenIDs: [1, 2], finishReason: "stop", parameters: job.parameters, stats: ["tokens": 2],
                                  model: ModelFingerprint(fingerprint: "m"), timings: ResultTimings(startedAt: 0, finishedAt: 1))
        let written = try ResultFile(directory: fixture.directory).write(record)
        #expect(try fixture.queue.complete(job: id, attempt: job.attempt, owner: "w", output: JobOutput(path: written.url.path, sha256: written.sha256)))
        // As a queue made before results were stored in the database: v1 alone, its result a file.
        try TestPostgres.shared().psql("""
            DROP TABLE dllava.snapshot_chunk, dllava.snapshot, dllava.result;
            DELETE FROM dllava.migration WHERE identifier IN ('v2-stored-artifacts', 'v3-snapshot-frames', 'v4-claim-by-image')
            """, database: String(fixture.location.split(separator: "/").last!))
        let location = try PostgresAddress(fixture.location).description
        #expect(throws: JobQueueError.olderSchema(path: location)) { try PostgresJobQueue(url: fixture.location, access: .readOnly) }
        let upgraded = try PostgresJobQueue(url: fixture.location)
        #expect(try upgraded.appliedMigrations() == ["v1-queue", "v2-stored-artifacts", "v3-snapshot-frames", "v4-job-progress", "v5-snapshot-secret", "v6-claim-by-image"])
        var exported: [ExportRecord] = []
        try ExportRecord.forEach(in: upgraded, .all) { exported.append($0) }
        #expect(exported.map(\.text) == ["three shapes"] && !exported[0].resultUnreadable, "\(exported)")
    }

    @Test func aDatabaseWithoutAQueueIsRefusedAndLeftUnchangedUnlessCreated() throws {
        let url = try TestPostgres.shared().createDatabase()
        let name = String(url.split(separator: "/").last!)
        defer { _ = try? TestPostgres.shared().psql("DROP DATABASE IF EXISTS \(name) WITH (FORCE)") }
        let location = try PostgresAddress(url).description
        #expect(throws: JobQueueError.noDatabase(path: location)) { try PostgresJobQueue(url: url) }
        #expect(throws: JobQueueError.noDatabase(path: location)) { try PostgresJobQueue(url: url, access: .readOnly) }
        let schemas = try TestPostgres.shared().psql("SELECT count(*) FROM pg_namespace WHERE nspname = 'dllava'", database: name)
        #expect(schemas.trimmingCharacters(in: .whitespacesAndNewlines) == "0")
    }

    @Test func aQueueFromANewerBuildIsRefused() throws {
        let fixture = try Fixture(.postgres)
        defer { fixture.remove() }
        try TestPostgres.shared().psql("INSERT INTO dllava.migration VALUES ('v99-future', 99, 0)",
                                       database: String(fixture.location.split(separator: "/").last!))
        #expect(throws: JobQueueError.newerSchema(path: try PostgresAddress(fixture.location).description)) {
            try PostgresJobQueue(url: fixture.location)
        }
    }

    @Test func theUnixSocketReachesTheSameQueue() throws {
        let fixture = try Fixture(.postgres)
        defer { fixture.remove() }
        let name = String(fixture.location.split(separator: "/").last!)
        let viaSocket = try PostgresJobQueue(url: try TestPostgres.shared().socketURL(database: name))
        #expect(viaSocket.identity == fixture.queue.identity)
    }

    @Test func malformedURLsAreRefusedWithTheirReason() throws {
        for (url, reason) in [("postgres://host/db", "it names no user (postgres://USER@host/database)"),
                              ("postgres://u@host", "it names no database (postgres://user@host/DATABASE)"),
                              ("postgres://u@host/db?application_name=x", "the parameter 'application_name' is not supported (only host, sslmode, sslrootcert)"),
                              ("postgres://u@host/db?sslmode=allow",
                               "sslmode=allow is not supported (it tries clear text first): use prefer, require, verify-ca or verify-full"),
                              ("postgres://u@host/db?sslmode=on", "sslmode must be one of disable, prefer, require, verify-ca, verify-full, not 'on'"),
                              ("postgres://u@localhost/db?host=/run/postgresql&sslmode=require",
                               "sslmode=require cannot be met over a Unix socket (host=/run/postgresql), which never uses TLS")] {
            #expect(throws: JobQueueError.badLocation(location: url, reason: reason)) { try PostgresAddress(url) }
        }
        // The password never shows in what errors print.
        #expect(try PostgresAddress("postgres://u:secret@h:6543/d").description == "postgres://u:***@h:6543/d")
        #expect(throws: JobQueueError.badLocation(location: "postgres://u:***@h/", reason: "it names no database (postgres://user@host/DATABASE)")) {
            try PostgresAddress("postgres://u:secret@h/")
        }
    }

    @Test func anIdleWorkerWakesWhenAJobIsEnqueuedElsewhere() throws {
        let fixture = try Fixture(.postgres)
        defer { fixture.remove() }
        let worker = try fixture.reopen()
        // The first wait opens the listening connection and returns at once (work may have come while no one listened).
        worker.waitForWork(upTo: 5)
        let start = Date()
        DispatchQueue.global().asyncAfter(deadline: .now() + 0.3) { _ = try? fixture.queue.enqueue(fixture.jobs(1)) }
        worker.waitForWork(upTo: 20)
        let waited = Date().timeIntervalSince(start)
        #expect(waited >= 0.25 && waited < 10, "waited \(waited) s")
        #expect(try worker.claim(owner: "w", limit: 1, leaseDuration: 60_000).count == 1)
    }

    /// The server goes away for a while (`pg_ctl stop -m fast`, as a crash or a restart cuts connections) and comes back:
    /// an operation under way waits and reconnects, says so, and loses nothing.
    @Test func operationsReconnectAfterTheServerRestarts() throws {
        let cluster = try TestPostgres.startDedicated()
        defer { cluster.stop() }
        try cluster.psql("CREATE DATABASE queue")
        let events = Collector<String>()
        let queue = try PostgresJobQueue(url: cluster.url(database: "queue"), access: .create, reconnectWindow: 60,
                                         report: { events.append($0) })
        let ids = try queue.enqueue((0..<20).map {
            NewJob(customID: "j\($0)", imagePath: "/i/\($0).jpg", imageSHA256: String(repeating: "c", count: 64), prompt: "Describe.")
        }).inserted
        try cluster.stopServer()
        let restart = Thread {
            Thread.sleep(forTimeInterval: 3)
            try? cluster.startServer()
        }
        restart.start()
        let start = Date()
        let claimed = try queue.claim(owner: "w", limit: 20, leaseDuration: 60_000)
        #expect(Date().timeIntervalSince(start) >= 2.5)
        #expect(claimed.map(\.id) == ids)
        for job in claimed {
            #expect(try queue.complete(job: job.id, attempt: job.attempt, owner: "w", output: JobOutput(path: "/o/\(job.id)", sha256: "s")))
        }
        #expect(try queue.counts()[.succeeded] == 20)
        #expect(events.values.first?.hasPrefix("lost the connection to postgres://dllava@127.0.0.1:\(cluster.port)/queue") == true, "\(events.values)")
        #expect(events.values.last?.hasPrefix("reconnected to") == true, "\(events.values)")
    }

    @Test func aServerThatStaysAwayIsAnUnreachableErrorAfterTheWindow() throws {
        let cluster = try TestPostgres.startDedicated()
        defer { cluster.stop() }
        try cluster.psql("CREATE DATABASE queue")
        let queue = try PostgresJobQueue(url: cluster.url(database: "queue"), access: .create, reconnectWindow: 1)
        try cluster.stopServer()
        #expect {
            _ = try queue.counts()
        } throws: { error in
            guard case .database(_, .unreachable, _) = error as? JobQueueError else { return false }
            return true
        }
    }
}
