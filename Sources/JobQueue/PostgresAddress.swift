import Foundation

/// Where a PostgreSQL queue lives and how to reach it, parsed from
/// `postgres://user[:password]@host[:port]/database[?host=/socket/dir&sslmode=MODE&sslrootcert=FILE]` (`postgresql://`
/// too), with libpq's names and meanings (docs/SECURITY.md):
/// - a `host` query parameter that is a folder connects through the server's Unix socket in it
///   (`<dir>/.s.PGSQL.<port>`);
/// - `sslmode` (else `$PGSSLMODE`, else `prefer`) and `sslrootcert` (else `$PGSSLROOTCERT`, else
///   `~/.postgresql/root.crt`) choose TLS (`SSLMode`);
/// - the password comes from the URL, else `$PGPASSWORD`, else the password file (`PasswordFile`), so that none need
///   be on a command line.
public struct PostgresAddress: Sendable, Hashable, CustomStringConvertible {
    public var user: String
    public var password: String?
    public var host: String
    public var port: Int
    public var database: String
    /// The server's Unix socket, when the URL names a socket folder.
    public var socketPath: String?
    public var sslMode: SSLMode
    /// The CA certificates (PEM) the server's certificate must chain to: always for `verify-ca` and `verify-full`
    /// (the file must exist), and for `require` when given or present at the default place (libpq's rule: `require`
    /// then verifies the chain as `verify-ca` does). Nil: no chain is checked.
    public var rootCertificatePath: String?

    /// libpq's `sslmode`s, less `allow` (refused: it would try a connection in clear text first).
    public enum SSLMode: String, Sendable, Hashable, CaseIterable {
        /// Never TLS.
        case disable
        /// TLS when the server offers it, else clear text; the certificate is not checked.
        case prefer
        /// TLS or no connection; the certificate is checked only against a root certificate when there is one.
        case require
        /// TLS, and the server's certificate must chain to the root certificate.
        case verifyCA = "verify-ca"
        /// As `verify-ca`, and the certificate must name the host connected to (its name, or its IP address).
        case verifyFull = "verify-full"

        var verifiesChain: Bool { self == .verifyCA || self == .verifyFull }
    }

    /// Whether `location` names a PostgreSQL queue rather than an SQLite file.
    public static func isPostgres(_ location: String) -> Bool {
        location.hasPrefix("postgres://") || location.hasPrefix("postgresql://")
    }

    /// Parses `location`; a malformed URL is `JobQueueError.badLocation` naming it (password hidden); a password file
    /// that others may read, or a root certificate that verification needs and that is missing, is
    /// `connectionSettings`.
    public init(_ location: String, environment: [String: String] = ProcessInfo.processInfo.environment) throws {
        func bad(_ reason: String) -> JobQueueError { .badLocation(location: Self.redacted(location), reason: reason) }
        guard Self.isPostgres(location), let components = URLComponents(string: location) else {
            throw bad("expected postgres://user@host:port/database")
        }
        guard let user = components.user, !user.isEmpty else { throw bad("it names no user (postgres://USER@host/database)") }
        let database = String(components.path.drop(while: { $0 == "/" }))
        guard !database.isEmpty, !database.contains("/") else { throw bad("it names no database (postgres://user@host/DATABASE)") }
        let parameters = components.queryItems ?? []
        if let unknown = parameters.first(where: { !Self.parameterNames.contains($0.name) }) {
            throw bad("the parameter '\(unknown.name)' is not supported (only \(Self.parameterNames.joined(separator: ", ")))")
        }
        func parameter(_ name: String) -> String? { parameters.last(where: { $0.name == name })?.value }
        let socketFolder = parameter("host")
        let host = components.host ?? ""
        if host.isEmpty && socketFolder == nil { throw bad("it names no host (postgres://user@HOST/database)") }
        self.user = user.removingPercentEncoding ?? user
        self.host = host.isEmpty ? "localhost" : host
        port = components.port ?? 5432
        self.database = database.removingPercentEncoding ?? database
        if let socketFolder {
            guard socketFolder.hasPrefix("/") else { throw bad("host= must be an absolute socket folder, not '\(socketFolder)'") }
            socketPath = (socketFolder as NSString).appendingPathComponent(".s.PGSQL.\(port)")
        }

        let modeText = parameter("sslmode") ?? environment["PGSSLMODE"] ?? SSLMode.prefer.rawValue
        guard let mode = SSLMode(rawValue: modeText) else {
            if modeText == "allow" { throw bad("sslmode=allow is not supported (it tries clear text first): use prefer, require, verify-ca or verify-full") }
            throw bad("sslmode must be one of \(SSLMode.allCases.map(\.rawValue).joined(separator: ", ")), not '\(modeText)'")
        }
        if socketPath != nil && mode != .disable && mode != .prefer {
            throw bad("sslmode=\(mode.rawValue) cannot be met over a Unix socket (host=\(socketFolder ?? "")), which never uses TLS")
        }
        sslMode = socketPath == nil ? mode : .disable
        let home = environment["HOME"] ?? NSHomeDirectory()
        let givenRoot = parameter("sslrootcert") ?? environment["PGSSLROOTCERT"]
        let root = givenRoot ?? (home as NSString).appendingPathComponent(".postgresql/root.crt")
        let displayed = Self.redacted(location)
        switch sslMode {
        case .verifyCA, .verifyFull:
            guard FileManager.default.fileExists(atPath: root) else {
                throw JobQueueError.connectionSettings(location: displayed, reason: "the root certificate file \(root) does not exist: give one with "
                                                       + "sslrootcert=FILE, or choose an sslmode that does not verify the server's certificate")
            }
            rootCertificatePath = root
        case .require:
            if givenRoot != nil && !FileManager.default.fileExists(atPath: root) {
                throw JobQueueError.connectionSettings(location: displayed, reason: "the root certificate file \(root) does not exist")
            }
            rootCertificatePath = FileManager.default.fileExists(atPath: root) ? root : nil
        case .disable, .prefer:
            rootCertificatePath = nil
        }

        password = try components.password.map { $0.removingPercentEncoding ?? $0 } ?? environment["PGPASSWORD"]
            ?? PasswordFile.password(environment: environment, home: home, location: displayed, host: self.host, port: port,
                                     database: self.database, user: self.user)
    }

    /// The query parameters a URL may carry.
    static let parameterNames = ["host", "sslmode", "sslrootcert"]

    /// The URL as errors and logs show it: never the password (`***` when there is one), and the TLS mode when it is
    /// not the default.
    public var description: String {
        "postgres://\(user)\(password == nil ? "" : ":***")@\(host):\(port)/\(database)" + (socketPath.map { " (socket \($0))" } ?? "")
            + (sslMode == .prefer || socketPath != nil ? "" : " (sslmode=\(sslMode.rawValue))")
    }

    static func redacted(_ location: String) -> String {
        guard var components = URLComponents(string: location), components.password != nil else { return location }
        components.password = "***"
        return components.string ?? location
    }
}

/// libpq's password file (`~/.pgpass`, or `$PGPASSFILE`): lines `host:port:database:user:password`, where each of the
/// first four fields may be `*` (anything), `\:` and `\\` stand for `:` and `\`, and lines starting with `#` are
/// comments. The first line that matches gives the password. A host given as a Unix socket folder matches `localhost`.
/// As with libpq, a file that group or others have any access to is not used; here it is refused, naming the file.
enum PasswordFile {
    static func password(environment: [String: String], home: String, location: String, host: String, port: Int, database: String,
                         user: String) throws -> String? {
        let path = environment["PGPASSFILE"] ?? (home as NSString).appendingPathComponent(".pgpass")
        var status = stat()
        guard stat(path, &status) == 0 else { return nil }
        guard status.st_mode & S_IFMT == S_IFREG else {
            throw JobQueueError.connectionSettings(location: location, reason: "the password file \(path) is not a regular file")
        }
        guard status.st_mode & 0o077 == 0 else {
            throw JobQueueError.connectionSettings(location: location, reason: "the password file \(path) has group or others access "
                                                   + "(mode \(String(status.st_mode & 0o777, radix: 8))): make it 0600 (chmod 600 \(path))")
        }
        let text: String
        do { text = try String(contentsOfFile: path, encoding: .utf8) } catch {
            throw JobQueueError.connectionSettings(location: location, reason: "the password file \(path) cannot be read as UTF-8 text")
        }
        return password(in: text, host: host, port: port, database: database, user: user)
    }

    /// The password of the first line of `text` that matches.
    static func password(in text: String, host: String, port: Int, database: String, user: String) -> String? {
        let wanted = [host, String(port), database, user]
        for line in text.split(omittingEmptySubsequences: true, whereSeparator: { $0 == "\n" || $0 == "\r\n" }) {
            if line.hasPrefix("#") { continue }
            let fields = split(line)
            guard fields.count >= 5 else { continue }
            if zip(fields.prefix(4), wanted).allSatisfy({ $0.isWildcard || $0.text == $1 }) {
                // A password may hold unescaped colons past the fourth separator.
                return fields.dropFirst(4).map(\.text).joined(separator: ":")
            }
        }
        return nil
    }

    /// The fields of a line, split at unescaped `:`, with `\:` and `\\` unescaped; a field written as a bare `*` is a
    /// wildcard (`\*` is a literal asterisk).
    static func split(_ line: Substring) -> [(text: String, isWildcard: Bool)] {
        var fields: [(text: String, isWildcard: Bool)] = []
        var text = "", raw = ""
        var escaped = false
        for character in line {
            if escaped {
                text.append(character)
                raw.append(character)
                escaped = false
            } else if character == "\\" {
                escaped = true
                raw.append(character)
            } else if character == ":" {
                fields.append((text, raw == "*"))
                text = ""
                raw = ""
            } else {
                text.append(character)
                raw.append(character)
            }
        }
        fields.append((text, raw == "*"))
        return fields
    }
}
