// TLS to the PostgreSQL queue with libpq's sslmode and sslrootcert, against a throwaway server holding a certificate
// from an authority the test makes; and passwords from PGPASSWORD and a libpq password file.
import CommandLineSupport
import Foundation
import JobQueue
import PostgresQueue
import Testing

@Suite("PostgreSQL connections: TLS and passwords", .serialized)
struct PostgresConnectionSecurityTests {
    static let password = "pw-\(UUID().uuidString.prefix(8))"

    @Test func sslModesConnectVerifyAndRefuseAsLibpqDoes() throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        // The server's certificate names localhost only: 127.0.0.1 is another name for verify-full.
        let certificates = try TestCertificates(in: directory, names: ["DNS:localhost"])
        let stranger = try TestCertificates(in: directory, prefix: "stranger-", names: ["DNS:localhost"])
        let cluster = try TestPostgres.startDedicated(certificates: certificates, password: Self.password)
        defer { cluster.stop() }
        try cluster.psql("CREATE DATABASE q")
        let root = certificates.authority
        func url(_ host: String, _ query: String) -> String {
            "postgres://\(TestPostgres.user):\(Self.password)@\(host):\(cluster.port)/q?\(query)"
        }
        /// Opens the queue at `url` and says whether its connection uses TLS (the server's view).
        func connectsWithTLS(_ url: String) throws -> Bool {
            let queue = try PostgresJobQueue(url: url, access: .create, reconnectWindow: 1)
            let encrypted = try cluster.psql("SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE ssl AND datname = 'q'")
            withExtendedLifetime(queue) {}
            return encrypted.trimmingCharacters(in: .whitespacesAndNewlines) != "0"
        }
        // Clear text first: no connection of an earlier check may still be counted.
        #expect(try !connectsWithTLS(url("127.0.0.1", "sslmode=disable")))
        #expect(try connectsWithTLS(url("localhost", "sslmode=verify-full&sslrootcert=\(root)")))
        #expect(try connectsWithTLS(url("127.0.0.1", "sslmode=verify-ca&sslrootcert=\(root)")))
        #expect(try connectsWithTLS(url("127.0.0.1", "sslmode=require")))
        #expect(try connectsWithTLS(url("127.0.0.1", "sslmode=prefer")))

        func refusal(_ url: String) -> String? {
            do {
                _ = try PostgresJobQueue(url: url, reconnectWindow: 1)
                return nil
            } catch let JobQueueError.connectionSettings(location, reason) {
                #expect(!location.contains(Self.password) && !reason.contains(Self.password))
                return reason
            } catch {
                return "another error: \(error)"
            }
        }
        let wrongName = refusal(url("127.0.0.1", "sslmode=verify-full&sslrootcert=\(root)"))
        #expect(wrongName?.hasPrefix("the server's certificate does not name the host connected to (sslmode=verify-full)") == true, "\(wrongName ?? "connected")")
        for mode in ["verify-ca", "verify-full", "require"] {
            let untrusted = refusal(url("localhost", "sslmode=\(mode)&sslrootcert=\(stranger.authority)"))
            #expect(untrusted?.hasPrefix("the TLS handshake failed") == true, "\(mode): \(untrusted ?? "connected")")
        }
        let missing = directory.appendingPathComponent("absent.crt").path
        #expect(refusal(url("localhost", "sslmode=verify-full&sslrootcert=\(missing)"))
            == "the root certificate file \(missing) does not exist: give one with sslrootcert=FILE, or choose an sslmode that does not verify the server's certificate")
    }

    @Test func requireRefusesAServerWithoutTLSWhichPreferUsesInClearText() throws {
        let fixture = try Fixture(.postgres)
        defer { fixture.remove() }
        let reason: String?
        do {
            _ = try PostgresJobQueue(url: fixture.location + "?sslmode=require", reconnectWindow: 1)
            reason = nil
        } catch let JobQueueError.connectionSettings(_, text) {
            reason = text
        }
        #expect(reason == "the server does not offer TLS, which sslmode requires")
        #expect(try PostgresJobQueue(url: fixture.location + "?sslmode=prefer").identity == fixture.queue.identity)
    }

    @Test func passwordsComeFromTheURLThenPGPASSWORDThenThePasswordFile() throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let file = directory.appendingPathComponent("pgpass")
        try Data("""
            # host:port:database:user:password
            other:5432:*:*:not-this
            db.example:5432:queue:ann:an\\:escaped\\\\one:with:colons
            *:6543:*:*:any-host
            db.example:*:*:*:wildcards

            """.utf8).write(to: file)
        try FileManager.default.setAttributes([.posixPermissions: 0o600], ofItemAtPath: file.path)
        let environment = ["PGPASSFILE": file.path, "HOME": directory.path]
        func password(_ url: String, _ extra: [String: String] = [:]) throws -> String? {
            try PostgresAddress(url, environment: environment.merging(extra) { $1 }).password
        }
        #expect(try password("postgres://ann@db.example/queue") == "an:escaped\\one:with:colons")
        #expect(try password("postgres://bob@db.example:6543/queue") == "any-host")
        #expect(try password("postgres://bob@db.example/other") == "wildcards")
        #expect(try password("postgres://bob@nowhere/other") == nil)
        #expect(try password("postgres://ann@db.example/queue", ["PGPASSWORD": "from-environment"]) == "from-environment")
        #expect(try password("postgres://ann:in-url@db.example/queue", ["PGPASSWORD": "from-environment"]) == "in-url")
        // ~/.pgpass when PGPASSFILE is not set.
        try FileManager.default.copyItem(at: file, to: directory.appendingPathComponent(".pgpass"))
        #expect(try PostgresAddress("postgres://bob@db.example/other", environment: ["HOME": directory.path]).password == "wildcards")

        // A file group or others may read is refused, naming it, as libpq refuses to use it.
        try FileManager.default.setAttributes([.posixPermissions: 0o640], ofItemAtPath: file.path)
        #expect(throws: JobQueueError.connectionSettings(location: "postgres://ann@db.example/queue",
                                                         reason: "the password file \(file.path) has group or others access (mode 640): make it 0600 (chmod 600 \(file.path))")) {
            try password("postgres://ann@db.example/queue")
        }
        // A password given otherwise needs no file.
        #expect(try password("postgres://ann@db.example/queue", ["PGPASSWORD": "from-environment"]) == "from-environment")
    }
}
