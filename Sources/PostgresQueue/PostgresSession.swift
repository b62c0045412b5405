import Foundation
import JobQueue
import Logging
import NIOCore
import NIOPosix
import NIOSSL
import PostgresNIO

/// One PostgreSQL connection used from synchronous threads (the daemon's loop and its heartbeat, a CLI command).
///
/// PostgresNIO is asynchronous; every call here blocks its caller on a future, never an event loop: the connection
/// runs on the process's one NIO event loop group (`MultiThreadedEventLoopGroup.singleton`). Calls are serialised by a
/// lock, so one connection serves all of a queue object's threads, as one SQLite writer does.
///
/// A lost connection (the server restarted, the network dropped) is reconnected with exponential backoff for up to
/// `reconnectWindow` seconds, and the interrupted operation is run again from its start: every operation is one
/// transaction, which the server rolled back when the connection went. Each reconnect is reported through `report`.
final class PostgresSession: @unchecked Sendable {
    let address: PostgresAddress
    let reconnectWindow: TimeInterval
    let report: @Sendable (String) -> Void
    private let lock = NSLock()
    private var connection: PostgresConnection?
    private var nextConnectionID = 0
    private let logger: Logger = {
        var logger = Logger(label: "dllava.postgres")
        logger.logLevel = .critical
        return logger
    }()

    init(address: PostgresAddress, reconnectWindow: TimeInterval, report: @escaping @Sendable (String) -> Void) {
        self.address = address
        self.reconnectWindow = reconnectWindow
        self.report = report
    }

    deinit { try? connection?.close().wait() }

    /// Runs `body` in one transaction (`BEGIN` ... `COMMIT`, rolled back on a thrown error), reconnecting and running
    /// it again after a lost connection. `readOnly` opens a REPEATABLE READ READ ONLY transaction: one consistent
    /// snapshot for every statement in it.
    @discardableResult
    func transaction<T>(readOnly: Bool = false, _ body: (PostgresStatements) throws -> T) throws -> T {
        try perform(begin: readOnly ? "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY" : "BEGIN", body)
    }

    /// Runs `body`, which runs one statement: its own transaction, one round trip instead of three.
    @discardableResult
    func statement<T>(_ body: (PostgresStatements) throws -> T) throws -> T {
        try perform(begin: nil, body)
    }

    private func perform<T>(begin: PostgresQuery?, _ body: (PostgresStatements) throws -> T) throws -> T {
        try lock.withLock {
            let start = Date()
            var delay = 0.1
            var failures = 0
            // Whether a connection was up when the first failure came (a lost one) or not (a server never reached).
            let wasConnected = connection != nil
            while true {
                do {
                    let statements = PostgresStatements(connection: try connected(), logger: logger)
                    if let begin { try statements.execute(begin) }
                    do {
                        let value = try body(statements)
                        if begin != nil { try statements.execute("COMMIT") }
                        if failures > 0 { report("reconnected to \(address) after \(failures) failed tr\(failures == 1 ? "y" : "ies")") }
                        return value
                    } catch {
                        if begin != nil && !Self.isTransient(error) { _ = try? statements.execute("ROLLBACK") }
                        throw error
                    }
                } catch let error where Self.isTransient(error) {
                    try? connection?.close().wait()
                    connection = nil
                    failures += 1
                    let waited = Date().timeIntervalSince(start)
                    if waited + delay > reconnectWindow {
                        throw JobQueueError.database(path: address.description, failure: .unreachable,
                                                     message: Self.describe(error) + (failures > 1 ? " (gave up after \(Int(waited.rounded())) s)" : ""))
                    }
                    if failures == 1 {
                        report("\(wasConnected ? "lost the connection to" : "cannot reach") \(address) (\(Self.describe(error))); "
                               + "retrying for up to \(Int(reconnectWindow)) s")
                    }
                    Thread.sleep(forTimeInterval: delay)
                    delay = min(delay * 2, 5)
                } catch let error as JobQueueError {
                    throw error
                } catch where Self.sqlState(error)?.hasPrefix("28") == true {
                    // Invalid authorization (a wrong or missing password, an unknown user): the settings, not the moment.
                    throw JobQueueError.connectionSettings(location: address.description, reason: Self.describe(error))
                } catch {
                    throw JobQueueError.database(path: address.description, failure: .other, message: Self.describe(error))
                }
            }
        }
    }

    private func connected() throws -> PostgresConnection {
        if let connection, !connection.isClosed { return connection }
        nextConnectionID += 1
        let connection = try Self.connect(address, id: nextConnectionID, logger: logger)
        self.connection = connection
        return connection
    }

    static func connect(_ address: PostgresAddress, id: Int, logger: Logger) throws -> PostgresConnection {
        var configuration: PostgresConnection.Configuration
        if let socketPath = address.socketPath {
            configuration = .init(unixSocketPath: socketPath, username: address.user, password: address.password, database: address.database)
        } else {
            configuration = .init(host: address.host, port: address.port, username: address.user, password: address.password,
                                  database: address.database, tls: try tls(address))
        }
        configuration.options.connectTimeout = .seconds(10)
        configuration.options.additionalStartupParameters = serverSettings
        do {
            return try PostgresConnection.connect(on: MultiThreadedEventLoopGroup.singleton.next(), configuration: configuration,
                                                  id: id, logger: logger).wait()
        } catch {
            guard let reason = tlsRefusal(error) else { throw error }
            throw JobQueueError.connectionSettings(location: address.description, reason: reason)
        }
    }

    /// The TLS of a TCP connection, by libpq's `sslmode` (`PostgresAddress.SSLMode`): none; offered (`prefer`) or required
    /// without checking the certificate; or required with the certificate checked against the root certificates, and
    /// for `verify-full` against the host name too (NIOSSL checks the name given, or the IP address connected to).
    static func tls(_ address: PostgresAddress) throws -> PostgresConnection.Configuration.TLS {
        guard address.sslMode != .disable else { return .disable }
        var tls = TLSConfiguration.makeClientConfiguration()
        if let root = address.rootCertificatePath {
            tls.trustRoots = .file(root)
            tls.certificateVerification = address.sslMode == .verifyFull ? .fullVerification : .noHostnameVerification
        } else {
            tls.certificateVerification = .none
        }
        let context: NIOSSLContext
        do { context = try NIOSSLContext(configuration: tls) } catch {
            throw JobQueueError.connectionSettings(location: address.description,
                                                   reason: "the root certificate file \(address.rootCertificatePath ?? "") cannot be used: \(error)")
        }
        return address.sslMode == .prefer ? .prefer(context) : .require(context)
    }

    /// Why a connection failed for its TLS, in a sentence, or nil when it failed for something else: the server does not
    /// offer TLS that the settings require, or its certificate failed verification. Neither is worth reconnecting for.
    static func tlsRefusal(_ error: Error) -> String? {
        let underlying = (error as? PSQLError).flatMap { $0.code == .sslUnsupported ? nil : $0.underlying } ?? error
        if let error = error as? PSQLError, error.code == .sslUnsupported {
            return "the server does not offer TLS, which sslmode requires"
        }
        if let failure = underlying as? NIOSSLExtraError, failure == .failedToValidateHostname {
            return "the server's certificate does not name the host connected to (sslmode=verify-full): \(failure)"
        }
        if underlying is NIOSSLError || underlying is BoringSSLError || underlying is NIOSSLExtraError {
            return "the TLS handshake failed (the server's certificate is not trusted by the root certificate, or TLS failed): \(underlying)"
        }
        return nil
    }

    /// Settings of every connection, for a client that vanishes without closing it (killed, its machine or network gone):
    /// the server would otherwise keep its backend, and the row locks of a transaction it left open, until TCP gives up
    /// (hours), and the other workers' writes to those rows would wait as long. The server probes a silent client after
    /// 10 s (and drops it after 3 more probes 5 s apart), and ends a transaction left idle for 15 s: this client's
    /// transactions send their statements back to back, and one cut short is run again like any after a lost
    /// connection.
    static let serverSettings: [(String, String)] = [
        ("idle_in_transaction_session_timeout", "15s"), ("tcp_keepalives_idle", "10"), ("tcp_keepalives_interval", "5"),
        ("tcp_keepalives_count", "3"),
    ]

    /// Errors worth running the transaction again for: no connection, a connection closed under us, the server
    /// shutting down or refusing connections for now (SQLSTATE classes 08 and 57, 53300 too many connections), a
    /// transaction the server ended for idling (25P03, `serverSettings`), and a deadlock or serialization failure the
    /// server resolved by rolling this transaction back (40P01, 40001).
    static func isTransient(_ error: Error) -> Bool {
        guard let error = error as? PSQLError else { return error is ChannelError || error is IOError || "\(type(of: error))".contains("Connect") }
        switch error.code {
        case .connectionError, .serverClosedConnection, .clientClosedConnection, .uncleanShutdown: return true
        case .server:
            let state = error.serverInfo?[.sqlState] ?? ""
            return state.hasPrefix("08") || state.hasPrefix("57") || ["53300", "25P03", "40P01", "40001"].contains(state)
        default: return false
        }
    }

    /// One line on a PostgresNIO error: the server's message and SQLSTATE, or the client-side cause.
    static func describe(_ error: Error) -> String {
        guard let error = error as? PSQLError else { return "\(error)" }
        if let info = error.serverInfo, let message = info[.message] {
            return message + (info[.sqlState].map { " (SQLSTATE \($0))" } ?? "") + (info[.detail].map { ": \($0)" } ?? "")
        }
        return "\(error.code)" + (error.underlying.map { ": \($0)" } ?? "")
    }

    /// The server's SQLSTATE of a failed statement, if the server answered.
    static func sqlState(_ error: Error) -> String? { (error as? PSQLError)?.serverInfo?[.sqlState] }
}

/// The statements of one transaction on one connection.
struct PostgresStatements {
    let connection: PostgresConnection
    let logger: Logger

    /// Runs `query` and returns its rows.
    @discardableResult
    func rows(_ query: PostgresQuery) throws -> [PostgresRow] {
        try connection.query(query, logger: logger).wait().rows
    }

    /// Runs `query` and returns how many rows it changed.
    @discardableResult
    func execute(_ query: PostgresQuery) throws -> Int {
        try connection.query(query, logger: logger).wait().metadata.rows ?? 0
    }
}
