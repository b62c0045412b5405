import Foundation

/// Where a PostgreSQL queue lives, parsed from `postgres://user[:password]@host[:port]/database[?host=/socket/dir]`
/// (`postgresql://` too). The password may also come from `PGPASSWORD`; a `host` query parameter that is a folder
/// connects through the server's Unix socket in it (`<dir>/.s.PGSQL.<port>`), as libpq does. TLS is not offered:
/// connect over a trusted network, a Unix socket or a tunnel.
public struct PostgresAddress: Sendable, Hashable, CustomStringConvertible {
    public var user: String
    public var password: String?
    public var host: String
    public var port: Int
    public var database: String
    /// The server's Unix socket, when the URL names a socket folder.
    public var socketPath: String?

    /// Whether `location` names a PostgreSQL queue rather than an SQLite file.
    public static func isPostgres(_ location: String) -> Bool {
        location.hasPrefix("postgres://") || location.hasPrefix("postgresql://")
    }

    /// Parses `location`; a malformed URL is `JobQueueError.badLocation` naming it (password hidden).
    public init(_ location: String, environment: [String: String] = ProcessInfo.processInfo.environment) throws {
        func bad(_ reason: String) -> JobQueueError { .badLocation(location: Self.redacted(location), reason: reason) }
        guard Self.isPostgres(location), let components = URLComponents(string: location) else {
            throw bad("expected postgres://user@host:port/database")
        }
        guard let user = components.user, !user.isEmpty else { throw bad("it names no user (postgres://USER@host/database)") }
        let database = String(components.path.drop(while: { $0 == "/" }))
        guard !database.isEmpty, !database.contains("/") else { throw bad("it names no database (postgres://user@host/DATABASE)") }
        let socketFolder = components.queryItems?.first(where: { $0.name == "host" })?.value
        let host = components.host ?? ""
        if host.isEmpty && socketFolder == nil { throw bad("it names no host (postgres://user@HOST/database)") }
        if let unknown = components.queryItems?.first(where: { $0.name != "host" }) {
            throw bad("the parameter '\(unknown.name)' is not supported (only host=/socket/folder)")
        }
        self.user = user.removingPercentEncoding ?? user
        password = components.password.map { $0.removingPercentEncoding ?? $0 } ?? environment["PGPASSWORD"]
        self.host = host.isEmpty ? "localhost" : host
        port = components.port ?? 5432
        self.database = database.removingPercentEncoding ?? database
        if let socketFolder {
            guard socketFolder.hasPrefix("/") else { throw bad("host= must be an absolute socket folder, not '\(socketFolder)'") }
            socketPath = (socketFolder as NSString).appendingPathComponent(".s.PGSQL.\(port)")
        }
    }

    /// The URL as errors and logs show it: the password, if any, replaced by `***`.
    public var description: String {
        "postgres://\(user)\(password == nil ? "" : ":***")@\(host):\(port)/\(database)" + (socketPath.map { " (socket \($0))" } ?? "")
    }

    static func redacted(_ location: String) -> String {
        guard var components = URLComponents(string: location), components.password != nil else { return location }
        components.password = "***"
        return components.string ?? location
    }
}
