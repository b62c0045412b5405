// The log lines of `dllava run`, through swift-log: plain sentences for people, or one JSON object per line for log
// shippers (journald, Vector, Loki, Elasticsearch).
import Foundation
import Logging

/// How log lines are written.
public enum LogFormat: String, Sendable, CaseIterable {
    /// `dllava: <message>`, as the CLI has always written.
    case plain
    /// One JSON object per line: `time` (RFC 3339, UTC, milliseconds), `level`, `message`, and, when known, `job_id`
    /// (a number), `custom_id` and `worker`; any other metadata as strings.
    case json
}

/// Formats each event as one line and hands it to `write` (which adds nothing; the line has no newline).
public struct RunLogHandler: LogHandler {
    public var logLevel: Logger.Level
    public var metadata: Logger.Metadata = [:]
    public var metadataProvider: Logger.MetadataProvider?
    public let format: LogFormat
    let write: @Sendable (String) -> Void

    public init(format: LogFormat, level: Logger.Level, write: @escaping @Sendable (String) -> Void) {
        self.format = format
        self.logLevel = level
        self.write = write
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        switch format {
        case .plain:
            write("dllava: \(event.message)")
        case .json:
            var fields = metadata
            if let provided = metadataProvider?.get() { fields.merge(provided) { $1 } }
            if let given = event.metadata { fields.merge(given) { $1 } }
            write(Self.jsonLine(time: Date(), level: event.level, message: "\(event.message)", metadata: fields))
        }
    }

    /// The JSON form of one event, keys in a fixed order: time, level, message, job_id, custom_id, worker, then the
    /// rest sorted.
    public static func jsonLine(time: Date, level: Logger.Level, message: String, metadata: Logger.Metadata) -> String {
        var parts = ["\"time\":\(quoted(timestamp(time)))", "\"level\":\(quoted(level.rawValue))", "\"message\":\(quoted(message))"]
        var rest = metadata
        if let job = rest.removeValue(forKey: "job_id") {
            let text = "\(job)"
            parts.append("\"job_id\":" + (Int64(text) != nil ? text : quoted(text)))
        }
        for key in ["custom_id", "worker"] {
            if let value = rest.removeValue(forKey: key) { parts.append("\(quoted(key)):\(quoted("\(value)"))") }
        }
        for key in rest.keys.sorted() { parts.append("\(quoted(key)):\(quoted("\(rest[key]!)"))") }
        return "{" + parts.joined(separator: ",") + "}"
    }

    static func timestamp(_ date: Date) -> String {
        let style = Date.ISO8601FormatStyle(includingFractionalSeconds: true, timeZone: TimeZone(identifier: "UTC")!)
        return date.formatted(style)
    }

    /// A JSON string literal.
    static func quoted(_ text: String) -> String {
        var out = "\""
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case _ where scalar.value < 0x20: out += String(format: "\\u%04x", scalar.value)
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out + "\""
    }
}
