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
    /// Server settings beyond the address, port and socket (TLS), for every start.
    let settings: String
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

    /// A cluster of its own that offers TLS with `certificates`' server certificate (when given), and whose TCP
    /// connections must give `password` (scram-sha-256; when given); the socket stays trusted for `psql`.
    public static func startDedicated(certificates: TestCertificates?, password: String?) throws -> TestPostgres {
        try TestPostgres(certificates: certificates, password: password)
    }

    /// At exit, without the lock (a test thread may still hold it).
    private static func stopShared() {
        if case .success(let started) = cluster { started.stop() }
    }

    private init(trustedNetworks: [String] = [], certificates: TestCertificates? = nil, password: String? = nil) throws {
        let bin = try Self.binaries()
        folder = URL(fileURLWithPath: "/tmp").appendingPathComponent("dllava-pg-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        if getuid() == 0 {
            // PostgreSQL will not run as root: hand the folder to nobody, and run the server as nobody.
            try FileManager.default.setAttributes([.ownerAccountID: 65534, .groupOwnerAccountID: 65534], ofItemAtPath: folder.path)
        }
        let data = folder.appendingPathComponent("data").path
        let authentication = password == nil ? ["--auth=trust"] : ["--auth-local=trust", "--auth-host=scram-sha-256"]
        try Self.run(bin.appendingPathComponent("initdb").path,
                     ["-D", data, "-U", Self.user, "--encoding=UTF8", "--no-locale", "--no-sync"] + authentication)
        var settings = ""
        if let certificates {
            // The server reads its key only when the server's user owns it and no one else may read it.
            for (source, name) in [(certificates.serverCertificate, "server.crt"), (certificates.serverKey, "server.key")] {
                let target = folder.appendingPathComponent(name).path
                try FileManager.default.copyItem(atPath: source, toPath: target)
                try FileManager.default.setAttributes([.posixPermissions: 0o600], ofItemAtPath: target)
                if getuid() == 0 {
                    try FileManager.default.setAttributes([.ownerAccountID: 65534, .groupOwnerAccountID: 65534], ofItemAtPath: target)
                }
            }
            settings = " -c ssl=on -c ssl_cert_file=\(folder.path)/server.crt -c ssl_key_file=\(folder.path)/server.key"
        }
        self.settings = settings
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
                "-c listen_addresses='\(listenAddresses)' -c port=\(candidate) -c unix_socket_directories=\(folder.path) -c fsync=off -c max_connections=200"
                    + settings,
            ])
            if started != nil { chosen = candidate; break }
        }
        guard let chosen else {
            let log = (try? String(contentsOf: folder.appendingPathComponent("server.log"), encoding: .utf8)) ?? ""
            throw Failure(message: "pg_ctl could not start a server in \(folder.path):\n\(log.suffix(2_000))")
        }
        port = chosen
        if let password { try psql("ALTER ROLE \(Self.user) PASSWORD '\(password)'") }
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
            "start", "-o", "-c listen_addresses='\(listenAddresses)' -c port=\(port) -c unix_socket_directories=\(folder.path) -c fsync=off -c max_connections=200"
                + settings,
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

/// A certificate authority made for a test, and a server certificate it signed (`openssl`, elliptic-curve keys, valid
/// for two days), as PEM files in `folder`.
public struct TestCertificates: Sendable {
    public let folder: URL
    /// The authority's certificate: what a client's `sslrootcert` names to trust the server.
    public let authority: String
    public let serverCertificate: String
    public let serverKey: String

    /// Makes the files in `folder` (created): an authority `<prefix>ca`, and a server certificate signed by it for
    /// `names` (its subject alternative names: `DNS:localhost`, `IP:127.0.0.1`, ...).
    public init(in folder: URL, prefix: String = "", names: [String]) throws {
        self.folder = folder
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        func file(_ name: String) -> String { folder.appendingPathComponent(prefix + name).path }
        authority = file("ca.crt")
        serverCertificate = file("server.crt")
        serverKey = file("server.key")
        let curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        try TestPostgres.run("/usr/bin/openssl", ["req", "-x509"] + curve + ["-keyout", file("ca.key"), "-out", authority, "-days", "2",
                             "-subj", "/CN=dllava test authority \(prefix)", "-addext", "basicConstraints=critical,CA:TRUE",
                             "-addext", "keyUsage=critical,keyCertSign,cRLSign"], asServerUser: false)
        try TestPostgres.run("/usr/bin/openssl", ["req"] + curve + ["-keyout", serverKey, "-out", file("server.csr"),
                             "-subj", "/CN=\(names.first.map { $0.split(separator: ":").last.map(String.init) ?? $0 } ?? "server")"], asServerUser: false)
        try Data("subjectAltName=\(names.joined(separator: ","))\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n".utf8)
            .write(to: URL(fileURLWithPath: file("server.ext")))
        try TestPostgres.run("/usr/bin/openssl", ["x509", "-req", "-in", file("server.csr"), "-CA", authority, "-CAkey", file("ca.key"),
                             "-CAcreateserial", "-out", serverCertificate, "-days", "2", "-extfile", file("server.ext")], asServerUser: false)
    }
}
