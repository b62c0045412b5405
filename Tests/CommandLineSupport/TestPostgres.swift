// A throwaway PostgreSQL cluster for the tests that run the queue contract, the CLI and the daemon on PostgreSQL.
import Foundation

/// One cluster per test process, started at first use from Debian's `postgresql` package (`Scripts/setup` installs it):
/// `initdb` into a temporary folder, `pg_ctl start` with a Unix socket in that folder and a loopback port, trust
/// authentication for the user `dllava`. Run as root (CI), the server runs as `nobody` (PostgreSQL refuses root).
/// The cluster is stopped and its folder removed when the test process exits.
///
/// A server that cannot start is an error, never a skip: the tests that need it fail and say why.
public final class TestPostgres: @unchecked Sendable {
    public let folder: URL
    public let port: Int
    /// `listen_addresses`: loopback, or every address when other networks are trusted.
    let listenAddresses: String
    public static let user = "dllava"

    /// The binaries of the installed major version (`/usr/lib/postgresql/<version>/bin`, the newest).
    public static func binaries() throws -> URL {
        let root = URL(fileURLWithPath: "/usr/lib/postgresql")
        let versions = ((try? FileManager.default.contentsOfDirectory(atPath: root.path)) ?? []).compactMap(Int.init).sorted()
        guard let newest = versions.last,
              FileManager.default.isExecutableFile(atPath: root.appendingPathComponent("\(newest)/bin/initdb").path) else {
            throw Failure(message: "PostgreSQL is not installed (no /usr/lib/postgresql/<version>/bin/initdb); run Scripts/setup, "
                          + "which installs Debian's postgresql package")
        }
        return root.appendingPathComponent("\(newest)/bin")
    }

    public struct Failure: Error, CustomStringConvertible {
        public let message: String
        public var description: String { "the test PostgreSQL server: \(message)" }
    }

    /// The process's cluster, started on first use (a start that failed is not tried again: every later caller gets
    /// the same failure).
    public static func shared() throws -> TestPostgres {
        try lock.withLock {
            if let cluster { return try cluster.get() }
            let started = Result { try TestPostgres() }
            cluster = started
            if case .success = started { atexit { TestPostgres.stopShared() } }
            return try started.get()
        }
    }

    private static let lock = NSLock()
    nonisolated(unsafe) private static var cluster: Result<TestPostgres, Error>?

    /// A cluster of its own, for a test that stops and starts its server; the caller `stop()`s it. `trustedNetworks`
    /// (CIDR) may also connect, over TCP on every address of this host, without a password (the network-namespace
    /// test's hosts); by default only loopback and the socket.
    public static func startDedicated(trustedNetworks: [String] = []) throws -> TestPostgres { try TestPostgres(trustedNetworks: trustedNetworks) }

    /// At exit, without the lock (a test thread may still hold it).
    private static func stopShared() {
        if case .success(let started) = cluster { started.stop() }
    }

    private init(trustedNetworks: [String] = []) throws {
        let bin = try Self.binaries()
        folder = URL(fileURLWithPath: "/tmp").appendingPathComponent("dllava-pg-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        if getuid() == 0 {
            // PostgreSQL will not run as root: hand the folder to nobody, and run the server as nobody.
            try FileManager.default.setAttributes([.ownerAccountID: 65534, .groupOwnerAccountID: 65534], ofItemAtPath: folder.path)
        }
        let data = folder.appendingPathComponent("data").path
        try Self.run(bin.appendingPathComponent("initdb").path,
                     ["-D", data, "-U", Self.user, "--auth=trust", "--encoding=UTF8", "--no-locale", "--no-sync"])
        if !trustedNetworks.isEmpty {
            let hba = URL(fileURLWithPath: data).appendingPathComponent("pg_hba.conf")
            let handle = try FileHandle(forWritingTo: hba)
            try handle.seekToEnd()
            try handle.write(contentsOf: Data(trustedNetworks.map { "host all all \($0) trust\n" }.joined().utf8))
            try handle.close()
        }
        listenAddresses = trustedNetworks.isEmpty ? "127.0.0.1" : "*"
        var chosen: Int?
        for _ in 0..<5 {
            let candidate = Int.random(in: 20_000..<60_000)
            let started = try? Self.run(bin.appendingPathComponent("pg_ctl").path, [
                "-D", data, "-l", folder.appendingPathComponent("server.log").path, "-w", "-t", "60", "start", "-o",
                "-c listen_addresses='\(listenAddresses)' -c port=\(candidate) -c unix_socket_directories=\(folder.path) -c fsync=off -c max_connections=200",
            ])
            if started != nil { chosen = candidate; break }
        }
        guard let chosen else {
            let log = (try? String(contentsOf: folder.appendingPathComponent("server.log"), encoding: .utf8)) ?? ""
            throw Failure(message: "pg_ctl could not start a server in \(folder.path):\n\(log.suffix(2_000))")
        }
        port = chosen
    }

    /// A URL on the loopback port.
    public func url(database: String) -> String { "postgres://\(Self.user)@127.0.0.1:\(port)/\(database)" }

    /// A URL through the Unix socket in the cluster's folder.
    public func socketURL(database: String) -> String { "postgres://\(Self.user)@localhost:\(port)/\(database)?host=\(folder.path)" }

    /// A new empty database; its URL.
    public func createDatabase() throws -> String {
        let name = "test_" + UUID().uuidString.lowercased().replacingOccurrences(of: "-", with: "").prefix(16)
        try psql("CREATE DATABASE \(name)")
        return url(database: String(name))
    }

    /// Runs `sql` through `psql` as the cluster's user on database `postgres`; its output.
    @discardableResult
    public func psql(_ sql: String, database: String = "postgres") throws -> String {
        try Self.run(try Self.binaries().appendingPathComponent("psql").path,
                     ["-h", folder.path, "-p", "\(port)", "-U", Self.user, "-d", database, "-v", "ON_ERROR_STOP=1", "-At", "-c", sql],
                     asServerUser: false)
    }

    /// `pg_ctl stop` (fast: connections are cut, as when a server goes away), or `start` again on the same port.
    public func stopServer() throws {
        try Self.run(try Self.binaries().appendingPathComponent("pg_ctl").path,
                     ["-D", folder.appendingPathComponent("data").path, "-w", "-m", "fast", "stop"])
    }

    public func startServer() throws {
        try Self.run(try Self.binaries().appendingPathComponent("pg_ctl").path, [
            "-D", folder.appendingPathComponent("data").path, "-l", folder.appendingPathComponent("server.log").path, "-w", "-t", "60",
            "start", "-o", "-c listen_addresses='\(listenAddresses)' -c port=\(port) -c unix_socket_directories=\(folder.path) -c fsync=off -c max_connections=200",
        ])
    }

    /// Stops the server and removes its folder.
    public func stop() {
        _ = try? stopServer()
        try? FileManager.default.removeItem(at: folder)
    }

    /// Runs a PostgreSQL program to completion (as `nobody` under root, for the server's programs); its standard
    /// output, or `Failure` with its standard error. Spawned and reaped by hand (`posix_spawn`, `waitpid`): Foundation's
    /// `Process` was seen never to notice the exit of `runuser pg_ctl start`, whose server lives on.
    @discardableResult
    static func run(_ program: String, _ arguments: [String], asServerUser: Bool = true) throws -> String {
        let command = asServerUser && getuid() == 0 ? ["/usr/sbin/runuser", "-u", "nobody", "--", program] + arguments : [program] + arguments
        let capture = FileManager.default.temporaryDirectory.appendingPathComponent("dllava-pg-run-\(UUID().uuidString)")
        let outputPath = capture.path + ".out", errorPath = capture.path + ".err"
        defer {
            try? FileManager.default.removeItem(atPath: outputPath)
            try? FileManager.default.removeItem(atPath: errorPath)
        }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, outputPath, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        posix_spawn_file_actions_addopen(&actions, 2, errorPath, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        // Nothing else of this process goes with it: the server outlives the call, and a pipe of a `dllava` another test
        // runs at that moment, inherited by the server, would never reach end of file and hang that test.
        // (glibc 2.34's `posix_spawn_file_actions_addclosefrom_np`, which the Glibc module does not declare.)
        typealias CloseFrom = @convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, Int32) -> Int32
        guard let closeFrom = dlsym(nil, "posix_spawn_file_actions_addclosefrom_np") else {
            throw Failure(message: "this C library lacks posix_spawn_file_actions_addclosefrom_np (glibc 2.34 or later is needed)")
        }
        _ = unsafeBitCast(closeFrom, to: CloseFrom.self)(&actions, 3)
        let argv = command.map { strdup($0) } + [nil]
        defer { for pointer in argv { free(pointer) } }
        var pid: pid_t = 0
        let spawned = posix_spawn(&pid, command[0], &actions, nil, argv, environ)
        guard spawned == 0 else { throw Failure(message: "cannot start \(command[0]): \(String(cString: strerror(spawned)))") }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) == -1 && errno == EINTR {}
        let output = (try? String(contentsOfFile: outputPath, encoding: .utf8)) ?? ""
        guard status == 0 else {
            let error = (try? String(contentsOfFile: errorPath, encoding: .utf8)) ?? ""
            throw Failure(message: "\((program as NSString).lastPathComponent) \(arguments.joined(separator: " ")) failed (wait status \(status)): \(error)")
        }
        return output
    }
}
