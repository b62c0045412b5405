// Workers as separate hosts: each in its own network namespace (and UTS namespace, so its own host name), reaching the
// PostgreSQL server over a veth link, sharing nothing with the other host but the connection string. One host's plug
// is pulled: all its processes killed and its link dropped. Needs root and `ip netns`; where they are missing the test
// does not run and says so (its `.enabled` reason shows in the test output).
import CommandLineSupport
import Foundation
import Testing

/// Runs `arguments` (found on PATH) to completion; its standard output, or an error with its standard error.
@discardableResult
func command(_ arguments: [String]) throws -> String {
    let result = try runProgram(URL(fileURLWithPath: "/usr/bin/env"), arguments)
    guard result.status == 0 else {
        throw CommandFailed(description: "\(arguments.joined(separator: " ")) failed: \(result.standardError)")
    }
    return result.standardOutput
}

struct CommandFailed: Error, CustomStringConvertible {
    var description: String
}

/// Whether this machine can make network namespaces (root, `ip netns`, `unshare`): probed once by making one.
let networkNamespacesAvailable: Bool = {
    guard getuid() == 0 else { return false }
    let probe = "dllava-probe-\(getpid())"
    guard (try? command(["ip", "netns", "add", probe])) != nil else { return false }
    defer { _ = try? command(["ip", "netns", "del", probe]) }
    return (try? command(["ip", "netns", "exec", probe, "unshare", "--uts", "true"])) != nil
}()

/// A "host": a network namespace with a veth link to the root namespace, where the server listens on every address.
/// The host reaches the server at `serverAddress`, the root end of its link.
struct NamespaceHost {
    let name: String
    let hostName: String
    let rootLink: String
    let serverAddress: String

    /// Host `index` on subnet 10.213.`subnet`.0/24 (root end .1, host end .2).
    init(index: Int, subnet: Int, tag: String) throws {
        name = "dllava-\(tag)-\(index)"
        hostName = "host-\(tag)-\(index)"
        rootLink = "dlv\(tag)\(index)r"
        serverAddress = "10.213.\(subnet).1"
        let hostLink = "dlv\(tag)\(index)h"
        try command(["ip", "netns", "add", name])
        try command(["ip", "link", "add", rootLink, "type", "veth", "peer", "name", hostLink])
        try command(["ip", "link", "set", hostLink, "netns", name])
        try command(["ip", "addr", "add", "\(serverAddress)/24", "dev", rootLink])
        try command(["ip", "link", "set", rootLink, "up"])
        try command(["ip", "netns", "exec", name, "ip", "addr", "add", "10.213.\(subnet).2/24", "dev", hostLink])
        try command(["ip", "netns", "exec", name, "ip", "link", "set", hostLink, "up"])
        try command(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"])
    }

    /// `dllava arguments` on this host, under its own host name; its stderr goes to `log` in `directory`. The process
    /// is `dllava` itself (`ip netns exec`, `unshare` and `sh` each exec the next).
    func start(_ arguments: [String], in directory: URL, log: String) throws -> Process {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["ip", "netns", "exec", name, "unshare", "--uts", "sh", "-c", "hostname \(hostName) && exec \"$0\" \"$@\"",
                             dllavaExecutable.path] + arguments
        process.currentDirectoryURL = directory
        process.standardOutput = FileHandle.nullDevice
        let file = directory.appendingPathComponent(log)
        _ = FileManager.default.createFile(atPath: file.path, contents: nil)
        process.standardError = try FileHandle(forWritingTo: file)
        try process.run()
        return process
    }

    /// Pulls the plug: kills every process in the namespace (SIGKILL) and drops its link.
    func pullPlug() throws {
        for pid in try command(["ip", "netns", "pids", name]).split(separator: "\n").compactMap({ Int32($0) }) { kill(pid, SIGKILL) }
        try command(["ip", "link", "del", rootLink])
    }

    func remove() {
        _ = try? command(["ip", "link", "del", rootLink])
        _ = try? command(["ip", "netns", "del", name])
    }
}

@Suite("workers as separate hosts in network namespaces", .serialized)
struct NetworkNamespaceTests {
    @Test("two hosts in network namespaces share a PostgreSQL queue; one host's plug is pulled (processes killed, link dropped) mid-batch: the other takes its jobs when their leases expire, resumes them from their stored snapshots, and every job succeeds once with the uninterrupted output",
          .enabled(if: networkNamespacesAvailable, "needs root and `ip netns` (network namespaces): this test did not run here"))
    func aHostWhosePlugIsPulledLosesItsJobsToTheOtherHostAtLeaseExpiry() throws {
        let started = Date()
        let expected = try referenceOutputs(kinds: 16)
        let tag = String(UInt32.random(in: 0..<(1 << 16)), radix: 16)
        let subnet = Int.random(in: 0..<127) * 2
        let cluster = try TestPostgres.startDedicated(trustedNetworks: ["10.213.0.0/16"])
        defer { cluster.stop() }
        let hosts = try (0..<2).map { try NamespaceHost(index: $0, subnet: subnet + $0, tag: tag) }
        defer { hosts.forEach { $0.remove() } }

        let count = 64
        let (url, directory) = try postgresWorkspace(manifest: (0..<count).map { PostgresDaemonTests.manifestLine($0, id: "job\($0)") }, cluster: cluster)
        defer { try? FileManager.default.removeItem(at: directory) }
        let database = String(url.split(separator: "/").last!)
        let workers = try hosts.enumerated().map { index, host in
            try host.start(["run", "--db", "postgres://\(TestPostgres.user)@\(host.serverAddress):\(cluster.port)/\(database)", "--model", model,
                            "--until-empty", "--batch-size", "4", "--threads", "1", "--lease", "4s", "--snapshot-every", "4"],
                           in: directory, log: "host\(index).log")
        }
        // Mid-batch: once host 0 has a running job with a stored snapshot, while enough jobs are still queued to keep
        // host 1 busy until host 0 looks silent (half a lease without a beat): a host 1 with nothing left to do
        // before then takes host 0 for a live worker and leaves its jobs to it (`--until-empty`). Host 0 is stopped
        // (SIGSTOP) and the condition checked again while it cannot move, so that it still holds when the plug is
        // pulled: a loaded machine could otherwise let host 0 finish those jobs (and drop their snapshots) between
        // check and pull.
        let ofHost0 = "state = 'running' AND lease_owner LIKE '\(hosts[0].hostName)-%'"
        func host0HoldsASnapshottedJob() throws -> Bool {
            let snapshotted = try cluster.psql("SELECT count(*) FROM dllava.snapshot WHERE job_id IN (SELECT id FROM dllava.job WHERE \(ofHost0))",
                                               database: database).trimmingCharacters(in: .whitespacesAndNewlines)
            let queued = try cluster.psql("SELECT count(*) FROM dllava.job WHERE state IN ('available', 'retryable')",
                                          database: database).trimmingCharacters(in: .whitespacesAndNewlines)
            return snapshotted != "0" && (Int(queued) ?? 0) >= count / 2
        }
        let deadline = Date().addingTimeInterval(120)
        while Date() < deadline {
            if try host0HoldsASnapshottedJob() {
                kill(workers[0].processIdentifier, SIGSTOP)
                if try host0HoldsASnapshottedJob() { break }
                kill(workers[0].processIdentifier, SIGCONT)
            }
            Thread.sleep(forTimeInterval: 0.2)
        }
        try hosts[0].pullPlug()
        let pulled = Date()
        // Its rows stay running under its name until their leases expire.
        let taken = try cluster.psql("SELECT string_agg(id::text, ',' ORDER BY id) FROM dllava.job WHERE \(ofHost0)", database: database)
            .trimmingCharacters(in: .whitespacesAndNewlines)
        // A safety net, not a timing: the other host must not hang on what the dead one left behind (its open
        // transaction's row locks are released when the server ends it: `PostgresSession.serverSettings`).
        let exitDeadline = Date().addingTimeInterval(180)
        while workers[1].isRunning && Date() < exitDeadline { Thread.sleep(forTimeInterval: 0.2) }
        if workers[1].isRunning { kill(workers[1].processIdentifier, SIGKILL) }
        for worker in workers { worker.waitUntilExit() }
        let secondsAfterPull = Int(Date().timeIntervalSince(pulled))
        let logs = (0..<2).map { (try? String(contentsOf: directory.appendingPathComponent("host\($0).log"), encoding: .utf8)) ?? "" }
        #expect(workers[0].terminationReason == .uncaughtSignal, "\(logs[0])")
        #expect(workers[1].terminationStatus == 0, "\(logs[1])")
        // The other host could not tell the dead worker from a silent one: it took its jobs only when their leases expired.
        #expect(!logs[1].contains("of dead workers on this host"), "\(logs[1])")

        let records = try export(url: url, in: directory)
        for i in 0..<count {
            #expect(records["job\(i)"]?["state"] as? String == "succeeded", "job\(i): \(records["job\(i)"] ?? [:])")
            #expect(records["job\(i)"]?["text"] as? String == expected["kind\(i % 16)"]?["text"] as? String, "job\(i)")
        }
        let orphaned = taken.split(separator: ",").map(String.init)
        #expect(!orphaned.isEmpty, "host 0 held no job when its plug was pulled")
        let attempts = try cluster.psql("SELECT string_agg(attempt::text, ',' ORDER BY id) FROM dllava.job WHERE id IN (\(taken.isEmpty ? "0" : taken))",
                                        database: database).trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(attempts.split(separator: ",").allSatisfy { $0 == "2" }, "attempts of \(taken): \(attempts)")
        #expect(orphaned.contains { logs[1].contains("resuming from the snapshot of job \($0) in ") }, "host 1: \(logs[1])\nhost 0: \(logs[0])")
        let stored = try cluster.psql("SELECT count(*), count(DISTINCT job_id) FROM dllava.result", database: database)
        #expect(stored.trimmingCharacters(in: .whitespacesAndNewlines) == "\(count)|\(count)", "\(stored)")
        print("network-namespace test: \(orphaned.count) jobs of the unplugged host finished by the other, which exited \(secondsAfterPull) s after "
              + "the plug was pulled; \(Int(Date().timeIntervalSince(started))) s in all")
    }
}
