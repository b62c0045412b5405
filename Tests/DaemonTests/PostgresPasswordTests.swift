// The PostgreSQL queue's password kept off the command line (PGPASSWORD, a libpq password file, DLLAVA_DB) and out of
// everything dllava writes: a worker's log and metrics, the report, the export, status and error messages; over TLS
// with sslmode=verify-full. The server is a throwaway cluster with a certificate from an authority the test makes.
import CommandLineSupport
import Foundation
import Testing

@Suite("dllava with a PostgreSQL password and TLS", .serialized)
struct PostgresPasswordTests {
    @Test("a password from PGPASSWORD, a password file or DLLAVA_DB reaches the server over verify-full TLS and never shows in logs, metrics, the report, the export, status or errors")
    func thePasswordNeverShows() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("dllava-pg-password-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let password = "s3cret-\(UUID().uuidString.prefix(12))"
        let certificates = try TestCertificates(in: directory.appendingPathComponent("tls"), names: ["DNS:localhost"])
        let cluster = try TestPostgres.startDedicated(certificates: certificates, password: password)
        defer { cluster.stop() }
        try cluster.psql("CREATE DATABASE q")
        let url = "postgres://\(TestPostgres.user)@localhost:\(cluster.port)/q?sslmode=verify-full&sslrootcert=\(certificates.authority)"
        let manifest = (0..<2).map { i in
            String(decoding: try! JSONSerialization.data(withJSONObject: ["custom_id": "job\(i)", "image": sample("test_00000\(i).png"),
                                                                          "prompt": "Describe picture \(i).", "max_tokens": 6]), as: UTF8.self)
        }
        try Data((manifest.joined(separator: "\n") + "\n").utf8).write(to: directory.appendingPathComponent("jobs.jsonl"))
        let passwordFile = directory.appendingPathComponent("pgpass")
        try Data("localhost:\(cluster.port):q:\(TestPostgres.user):\(password)\n".utf8).write(to: passwordFile)
        try FileManager.default.setAttributes([.posixPermissions: 0o600], ofItemAtPath: passwordFile.path)
        // A home without a password file or root certificate of its own.
        let home = ["HOME": directory.path]
        var everything = ""
        func dllava(_ arguments: [String], _ environment: [String: String]) throws -> ProcessResult {
            let result = try runDLLaVA(arguments, in: directory, environment: home.merging(environment) { $1 })
            everything += result.standardOutput + result.standardError
            return result
        }

        let created = try dllava(["init", "--db", url], ["PGPASSWORD": password])
        #expect(created.status == 0, "\(created.standardError)")
        #expect(try dllava(["enqueue", "--db", url, "--jsonl", "jobs.jsonl"], ["PGPASSWORD": password]).status == 0)
        let worker = try dllava(["run", "--db", url, "--model", tinyModel, "--until-empty", "--batch-size", "2", "--threads", "1",
                                 "--metrics-file", "metrics.prom", "--log-level", "debug"], ["PGPASSFILE": passwordFile.path])
        #expect(worker.status == 0, "\(worker.standardError)")
        // The whole URL, password included, in DLLAVA_DB: nothing on the command line.
        let inURL = "postgres://\(TestPostgres.user):\(password)@localhost:\(cluster.port)/q?sslmode=verify-full&sslrootcert=\(certificates.authority)"
        let status = try dllava(["status"], ["DLLAVA_DB": inURL])
        #expect(status.status == 0 && status.standardOutput.contains("succeeded"), "\(status.standardError)")
        #expect(try dllava(["report", "--output", "report.html"], ["DLLAVA_DB": inURL]).status == 0)
        let exported = try dllava(["export", "--output", "-"], ["DLLAVA_DB": inURL])
        #expect(exported.status == 0 && exported.standardOutput.split(separator: "\n").count == 2, "\(exported.standardError)")
        #expect(try dllava(["show", "1", "--json"], ["DLLAVA_DB": inURL]).status == 0)

        // Refusals say why, exit 78, and do not echo what was given.
        let wrong = try dllava(["status", "--db", url], ["PGPASSWORD": "not-" + password])
        #expect(wrong.status == 78 && wrong.standardError.contains("password authentication failed"), "\(wrong.standardError)")
        let noTLS = try dllava(["status", "--db", url.replacingOccurrences(of: "localhost", with: "127.0.0.1")], ["PGPASSWORD": password])
        #expect(noTLS.status == 78 && noTLS.standardError.contains("does not name the host connected to"), "\(noTLS.standardError)")
        try FileManager.default.setAttributes([.posixPermissions: 0o644], ofItemAtPath: passwordFile.path)
        let readable = try dllava(["status", "--db", url], ["PGPASSFILE": passwordFile.path])
        #expect(readable.status == 78 && readable.standardError.contains("the password file \(passwordFile.path) has group or others access"),
                "\(readable.standardError)")

        let written = ["metrics.prom", "report.html"].map { (try? String(contentsOf: directory.appendingPathComponent($0), encoding: .utf8)) ?? "" }
        #expect(written.allSatisfy { !$0.isEmpty })
        #expect(!(everything + written.joined()).contains(password), "the password shows in: \(everything)")
    }
}
