import Foundation

/// Reads a file in 256 KiB pieces and hands out lines (without their `\n`) or single bytes.
final class ChunkedReader {
    private let handle: FileHandle
    private var buffer: [UInt8] = []
    private var position = 0
    private var atEnd = false
    let path: String

    init(path: String) throws {
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory), !isDirectory.boolValue,
              let handle = FileHandle(forReadingAtPath: path) else {
            throw ManifestError(file: path, reason: "no such file, or it cannot be read")
        }
        self.handle = handle
        self.path = path
    }

    deinit { try? handle.close() }

    /// False at the end of the file.
    private func fill() throws -> Bool {
        if position < buffer.count { return true }
        if atEnd { return false }
        let chunk: Data?
        do { chunk = try handle.read(upToCount: 1 << 18) } catch {
            throw ManifestError(file: path, reason: "read failed: \(error.localizedDescription)")
        }
        guard let chunk, !chunk.isEmpty else { atEnd = true; return false }
        buffer = [UInt8](chunk)
        position = 0
        return true
    }

    func nextByte() throws -> UInt8? {
        guard try fill() else { return nil }
        defer { position += 1 }
        return buffer[position]
    }

    /// The next line without its `\n` (a `\r` before it is kept), or nil at the end of the file.
    func nextLine() throws -> [UInt8]? {
        var line: [UInt8] = []
        var sawAny = false
        while try fill() {
            sawAny = true
            if let newline = buffer[position...].firstIndex(of: 0x0A) {
                line += buffer[position ..< newline]
                position = newline + 1
                return line
            }
            line += buffer[position...]
            position = buffer.count
        }
        return sawAny ? line : nil
    }
}

/// A CSV record: its fields, or why it is malformed.
struct CSVRecord {
    var fields: [String]
    var problem: String?
}

/// RFC 4180 records, streamed: a quoted field may span lines, so records are read byte by byte, not by line.
/// Lenient where RFC 4180 leaves no doubt about the intent: a quote inside an unquoted field is kept as a
/// character, and a record may end in LF as well as CRLF.
struct CSVRecordReader {
    let reader: ChunkedReader
    /// The line the next byte is on.
    var line = 1
    var pendingByte: UInt8?

    init(reader: ChunkedReader) { self.reader = reader }

    private mutating func byte() throws -> UInt8? {
        if let pendingByte { self.pendingByte = nil; return pendingByte }
        return try reader.nextByte()
    }

    private enum State { case fieldStart, unquoted, quoted, quotedSawQuote, afterQuoted }

    /// The next record and the line it starts on, or nil at the end of the file.
    mutating func next() throws -> (Int, CSVRecord)? {
        let quote: UInt8 = 0x22, comma: UInt8 = 0x2C, lf: UInt8 = 0x0A, cr: UInt8 = 0x0D
        let startLine = line
        var fields: [String] = []
        var field: [UInt8] = []
        var problem: String?
        var state = State.fieldStart
        var sawAny = false
        var quoteLine = startLine
        func record() -> (Int, CSVRecord) {
            fields.append(String(decoding: field, as: UTF8.self))
            return (startLine, CSVRecord(fields: fields, problem: problem))
        }
        while true {
            guard let c = try byte() else {
                if !sawAny { return nil }
                if state == .quoted {
                    let lines = line > quoteLine ? "lines \(quoteLine)-\(line)" : "line \(quoteLine)"
                    problem = problem ?? "the quoted field opened on line \(quoteLine) is never closed: it swallowed \(lines) to the end of "
                        + "the file (\(line - startLine + 1) line\(line == startLine ? "" : "s"), none enqueued); close the quote"
                }
                return record()
            }
            sawAny = true
            switch state {
            case .quoted:
                if c == quote { state = .quotedSawQuote } else {
                    if c == lf { line += 1 }
                    field.append(c)
                }
                continue
            case .quotedSawQuote:
                if c == quote { field.append(quote); state = .quoted; continue }
                state = .afterQuoted
            default:
                break
            }
            if c == comma {
                fields.append(String(decoding: field, as: UTF8.self))
                field.removeAll(keepingCapacity: true)
                state = .fieldStart
                continue
            }
            if c == lf {
                line += 1
                return record()
            }
            if c == cr {
                let after = try byte()
                if after == lf || after == nil {
                    if after == lf { line += 1 }
                    return record()
                }
                pendingByte = after
            }
            switch state {
            case .fieldStart:
                if c == quote { state = .quoted; quoteLine = line } else { field.append(c); state = .unquoted }
            case .afterQuoted:
                problem = problem ?? "text after the closing quote of a field"
            default:
                field.append(c)
            }
        }
    }
}
