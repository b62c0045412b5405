import Foundation

/// One line (or folder entry) that could not be enqueued, and why. The rest of the manifest still is.
public struct ManifestProblem: Sendable, Hashable, CustomStringConvertible {
    public var file: String
    /// 1-based; for CSV the line where the record starts; nil for folder entries.
    public var line: Int?
    public var reason: String

    public var description: String {
        line.map { "\(file):\($0): \(reason)" } ?? "\(file): \(reason)"
    }
}

/// How manifest lines become jobs.
public struct ManifestOptions: Sendable {
    /// Parameters for fields a line leaves out (a line's own values win).
    public var defaults: JobParameters
    /// Priority for lines without a `priority` field.
    public var priority: Int
    public var maxAttempts: Int
    /// Jobs per write transaction.
    public var chunkSize: Int

    public init(defaults: JobParameters = JobParameters(), priority: Int = 0, maxAttempts: Int = 3, chunkSize: Int = 1_000) {
        self.defaults = defaults
        self.priority = priority
        self.maxAttempts = maxAttempts
        self.chunkSize = chunkSize
    }
}

/// What enqueueing a manifest did.
public struct ManifestReport: Sendable, Hashable {
    public var inserted = 0
    public var alreadyPresent = 0
    public var problems: [ManifestProblem] = []
    public init() {}
}

/// A manifest that cannot be read at all (as opposed to a bad line in it).
public struct ManifestError: Error, Sendable, Hashable, CustomStringConvertible {
    public var file: String
    public var reason: String
    public var description: String { "\(file): \(reason)" }
}

/// Writing a manifest's jobs failed part way (a full disk, an I/O error): `inserted` jobs were committed before it,
/// and running the same command again enqueues the rest (the committed ones are skipped by their idempotency key).
public struct ManifestInterrupted: Error {
    public var file: String
    public var inserted: Int
    public var alreadyPresent: Int
    public var underlying: Error
}

extension JobQueue {
    /// Enqueues every `.jpg`, `.jpeg` and `.png` file (any letter case) in `folder` with one prompt, sorted by
    /// path relative to the folder; subfolders only with `recursive`. Jobs have no custom id: re-running the same
    /// command enqueues only images that are new (by content).
    public func enqueueFolder(_ folder: URL, prompt: String, recursive: Bool = false, options: ManifestOptions = ManifestOptions(),
                              onProblem: (ManifestProblem) -> Void = { _ in }) throws -> ManifestReport {
        try withoutActuallyEscaping(onProblem) { onProblem in
            let root = folder.standardizedFileURL
            var isDirectory: ObjCBool = false
            guard FileManager.default.fileExists(atPath: root.path, isDirectory: &isDirectory), isDirectory.boolValue else {
                throw ManifestError(file: root.path, reason: "no such folder")
            }
            guard !prompt.isEmpty else { throw ManifestError(file: root.path, reason: "the prompt is empty") }
            if let problem = options.defaults.problem() { throw ManifestError(file: root.path, reason: problem) }
            let extensions: Set<String> = ["jpg", "jpeg", "png"]
            var relativePaths: [String] = []
            if recursive {
                guard let enumerator = FileManager.default.enumerator(atPath: root.path) else {
                    throw ManifestError(file: root.path, reason: "cannot list the folder")
                }
                while let relative = enumerator.nextObject() as? String {
                    if extensions.contains((relative as NSString).pathExtension.lowercased()) { relativePaths.append(relative) }
                }
            } else {
                relativePaths = try FileManager.default.contentsOfDirectory(atPath: root.path)
                    .filter { extensions.contains(($0 as NSString).pathExtension.lowercased()) }
            }
            relativePaths.sort()
            var batch = ManifestBatch(queue: self, file: root.path, options: options, onProblem: onProblem)
            for relative in relativePaths {
                let path = root.appendingPathComponent(relative).path
                var isDirectory: ObjCBool = false
                if FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory), isDirectory.boolValue { continue }
                try batch.add(line: nil, entry: ManifestEntry(customID: String?.none, image: path, prompt: prompt,
                                                              parameters: JobParameters(), priority: nil))
            }
            return try batch.finish()
        }
    }

    /// Enqueues a JSONL manifest, one job per line:
    /// `{"custom_id": "...", "image": "a.jpg", "prompt": "...", optional max_tokens, temperature, top_p, top_k,
    /// seed, stop (a string or a list), sparsity, vision_keep_rate, priority}`. Blank lines are skipped; unknown
    /// fields are errors. Read line by line; jobs are written `options.chunkSize` per transaction.
    public func enqueueJSONL(_ file: URL, options: ManifestOptions = ManifestOptions(),
                             onProblem: (ManifestProblem) -> Void = { _ in }) throws -> ManifestReport {
        try withoutActuallyEscaping(onProblem) { onProblem in
            let reader = try ChunkedReader(path: file.path)
            var batch = ManifestBatch(queue: self, file: file.path, options: options, onProblem: onProblem)
            let decoder = JSONDecoder()
            var lineNumber = 0
            while var line = try reader.nextLine() {
                lineNumber += 1
                if lineNumber == 1, line.starts(with: [0xEF, 0xBB, 0xBF]) { line.removeFirst(3) }
                if line.allSatisfy({ $0 == 0x20 || $0 == 0x09 || $0 == 0x0D }) { continue }
                if let problem = JSONLineCheck.problem(in: line) {
                    batch.report(line: lineNumber, problem)
                    continue
                }
                let entry: ManifestEntry
                do {
                    entry = try decoder.decode(ManifestEntry.self, from: Data(line))
                } catch let error as ManifestLineError {
                    batch.report(line: lineNumber, error.reason)
                    continue
                } catch DecodingError.typeMismatch {
                    batch.report(line: lineNumber, "not a JSON object")
                    continue
                } catch {
                    batch.report(line: lineNumber, "not valid JSON")
                    continue
                }
                try batch.add(line: lineNumber, entry: entry)
            }
            return try batch.finish()
        }
    }

    /// Enqueues a CSV manifest (RFC 4180: comma-separated, fields with commas, quotes or line breaks in double
    /// quotes, `""` for a quote). The header row is required and names columns as JSONL names fields; `image`
    /// and `prompt` are required columns; an empty cell means "not given"; `stop` holds one stop string.
    public func enqueueCSV(_ file: URL, options: ManifestOptions = ManifestOptions(),
                           onProblem: (ManifestProblem) -> Void = { _ in }) throws -> ManifestReport {
        try withoutActuallyEscaping(onProblem) { onProblem in
            let reader = try ChunkedReader(path: file.path)
            var records = CSVRecordReader(reader: reader)
            guard let (_, header) = try records.next() else { throw ManifestError(file: file.path, reason: "empty CSV: no header row") }
            var columns = header.fields.map { $0.trimmingCharacters(in: .whitespaces) }
            if let first = columns.first, first.hasPrefix("\u{FEFF}") { columns[0] = String(first.dropFirst()) }
            if let reason = header.problem { throw ManifestError(file: file.path, reason: "header row: \(reason)") }
            for column in columns where !ManifestEntry.fields.contains(column) {
                throw ManifestError(file: file.path, reason: "unknown column '\(column)' in the header")
            }
            if Set(columns).count != columns.count { throw ManifestError(file: file.path, reason: "a column is named twice in the header") }
            for required in ["image", "prompt"] where !columns.contains(required) {
                throw ManifestError(file: file.path, reason: "the header has no '\(required)' column")
            }
            var batch = ManifestBatch(queue: self, file: file.path, options: options, onProblem: onProblem)
            while let (lineNumber, record) = try records.next() {
                if let reason = record.problem { batch.report(line: lineNumber, reason); continue }
                if record.fields == [""] { continue }
                guard record.fields.count == columns.count else {
                    batch.report(line: lineNumber, "\(record.fields.count) fields where the header has \(columns.count)")
                    continue
                }
                do {
                    try batch.add(line: lineNumber, entry: ManifestEntry(csvFields: Dictionary(uniqueKeysWithValues: zip(columns, record.fields))))
                } catch let error as ManifestLineError {
                    batch.report(line: lineNumber, error.reason)
                }
            }
            return try batch.finish()
        }
    }
}

/// A reason a single manifest line is rejected.
struct ManifestLineError: Error {
    var reason: String
    init(_ reason: String) { self.reason = reason }
}

/// One manifest line, decoded but not yet checked against the file system.
struct ManifestEntry {
    var customID: String?
    var image: String
    var prompt: String
    var parameters: JobParameters
    var priority: Int?

    static let fields: Set<String> = Set(JobParameters.CodingKeys.allCases.map(\.stringValue) + ["custom_id", "image", "prompt", "priority"])

    init(customID: String?, image: String, prompt: String, parameters: JobParameters, priority: Int?) {
        self.customID = customID
        self.image = image
        self.prompt = prompt
        self.parameters = parameters
        self.priority = priority
    }

    /// From a CSV record: empty cells are absent; the rest decode as the same JSON object's strings would, through
    /// the one parameter schema (`JobParameters.textValuesKey` parses numbers from their text).
    init(csvFields cells: [String: String]) throws {
        let given = cells.filter { !$0.value.isEmpty }
        // Strings always encode.
        let object = try! JSONEncoder().encode(given)
        let decoder = JSONDecoder()
        decoder.userInfo[JobParameters.textValuesKey] = true
        do {
            self = try decoder.decode(ManifestEntry.self, from: object)
        } catch let error as ManifestLineError {
            throw error
        } catch {
            throw ManifestLineError("the row cannot be read: \(error)")
        }
    }
}

extension ManifestEntry: Decodable {
    struct Key: CodingKey {
        var stringValue: String
        var intValue: Int? { nil }
        init(_ name: String) { stringValue = name }
        init?(stringValue: String) { self.stringValue = stringValue }
        init?(intValue: Int) { nil }
    }

    init(from decoder: Decoder) throws {
        let container = try decoder.container(keyedBy: Key.self)
        for key in container.allKeys where !Self.fields.contains(key.stringValue) {
            throw ManifestLineError("unknown field '\(key.stringValue)'")
        }
        let text = decoder.userInfo[JobParameters.textValuesKey] as? Bool == true
        func string(_ name: String) throws -> String? {
            let key = Key(name)
            guard container.contains(key), !(try container.decodeNil(forKey: key)) else { return nil }
            do { return try container.decode(String.self, forKey: key) } catch { throw ManifestLineError("\(name) must be a string") }
        }
        guard let image = try string("image") else { throw ManifestLineError("no image") }
        guard let prompt = try string("prompt") else { throw ManifestLineError("no prompt") }
        var priority: Int?
        let priorityKey = Key("priority")
        if container.contains(priorityKey), !(try container.decodeNil(forKey: priorityKey)) {
            if text {
                let cell = try container.decode(String.self, forKey: priorityKey)
                guard let value = Int(cell.trimmingCharacters(in: .whitespaces)) else { throw ManifestLineError("priority must be an integer, not '\(cell)'") }
                priority = value
            } else {
                do { priority = try container.decode(Int.self, forKey: priorityKey) } catch { throw ManifestLineError("priority must be an integer") }
            }
        }
        let parameters: JobParameters
        do { parameters = try JobParameters(from: decoder) } catch let error as JobParameters.FieldError { throw ManifestLineError(error.reason) }
        self.init(customID: try string("custom_id"), image: image, prompt: prompt, parameters: parameters, priority: priority)
    }
}

/// Turns manifest entries into jobs (resolving and hashing images) and enqueues them a chunk at a time.
struct ManifestBatch {
    let queue: JobQueue
    let file: String
    let folder: URL
    let options: ManifestOptions
    let onProblem: (ManifestProblem) -> Void
    var pending: [NewJob] = []
    /// The manifest line of each pending job (nil for folder entries), to name it in a conflict.
    var pendingLines: [Int?] = []
    /// custom_id -> the first line that gave it and that line's content key, to tell a repeated line from a conflict.
    var customIDs: [String: (line: Int?, content: String)] = [:]
    var report = ManifestReport()
    /// Image path -> sha256, so a manifest that asks several questions of one image reads it once.
    var hashes: [String: String] = [:]

    init(queue: JobQueue, file: String, options: ManifestOptions, onProblem: @escaping (ManifestProblem) -> Void) {
        self.queue = queue
        self.file = file
        self.folder = URL(fileURLWithPath: file).deletingLastPathComponent()
        self.options = options
        self.onProblem = onProblem
    }

    mutating func report(line: Int?, _ reason: String) {
        let problem = ManifestProblem(file: file, line: line, reason: reason)
        report.problems.append(problem)
        onProblem(problem)
    }

    mutating func add(line: Int?, entry: ManifestEntry) throws {
        if entry.prompt.isEmpty { return report(line: line, "the prompt is empty") }
        if entry.customID?.isEmpty == true { return report(line: line, "custom_id is empty") }
        let parameters = options.defaults.overridden(by: entry.parameters)
        if let problem = parameters.problem() { return report(line: line, problem) }
        let image = entry.image.hasPrefix("/") ? URL(fileURLWithPath: entry.image) : folder.appendingPathComponent(entry.image)
        let path = image.standardizedFileURL.path
        let sha256: String
        if let known = hashes[path] {
            sha256 = known
        } else {
            var isDirectory: ObjCBool = false
            guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) else {
                return report(line: line, "image \(path) not found")
            }
            if isDirectory.boolValue { return report(line: line, "image \(path) is a folder") }
            guard Hashing.isRegularFile(path) else {
                return report(line: line, "image \(path) is not a regular file (a FIFO, socket or device); skipped")
            }
            guard let hash = try? Hashing.sha256Hex(fileAt: path) else { return report(line: line, "image \(path) cannot be read") }
            if hashes.count >= 4_096 { hashes.removeAll(keepingCapacity: true) }
            hashes[path] = hash
            sha256 = hash
        }
        let job = NewJob(customID: entry.customID, imagePath: path, imageSHA256: sha256, prompt: entry.prompt,
                         parameters: parameters, priority: entry.priority ?? options.priority, maxAttempts: options.maxAttempts)
        if let customID = entry.customID {
            let content = NewJob.contentKey(imageSHA256: sha256, prompt: entry.prompt, parameters: parameters)
            if let first = customIDs[customID] {
                if first.content != content {
                    let firstPlace = first.line.map { "line \($0)" } ?? "an earlier entry"
                    return report(line: line, "custom_id '\(customID)' is also on \(firstPlace) with another image, prompt or parameters; "
                                  + "this line is not enqueued (give it its own custom_id)")
                }
            } else {
                customIDs[customID] = (line, content)
            }
        }
        pending.append(job)
        pendingLines.append(line)
        if pending.count >= options.chunkSize { try flush() }
    }

    mutating func flush() throws {
        guard !pending.isEmpty else { return }
        let result: EnqueueResult
        do {
            result = try queue.enqueue(pending)
        } catch {
            throw ManifestInterrupted(file: file, inserted: report.inserted, alreadyPresent: report.alreadyPresent, underlying: error)
        }
        report.inserted += result.inserted.count
        report.alreadyPresent += result.alreadyPresent.count
        for conflict in result.conflicts {
            report(line: pendingLines[conflict.index], "custom_id '\(pending[conflict.index].customID ?? "")' is already queued as job "
                   + "\(conflict.existingID) with another image, prompt or parameters; this line is not enqueued (give it its own custom_id)")
        }
        pending.removeAll(keepingCapacity: true)
        pendingLines.removeAll(keepingCapacity: true)
    }

    mutating func finish() throws -> ManifestReport {
        try flush()
        return report
    }
}

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

/// Checks a JSONL line's bytes for what JSONDecoder would misreport or let through: bytes that are not UTF-8, a NUL,
/// a `\u0000` or a lone UTF-16 surrogate escape in a string, and a key given twice in the top-level object (JSON
/// leaves duplicates undefined; a manifest must not depend on which one wins).
enum JSONLineCheck {
    static func problem(in line: [UInt8]) -> String? {
        var iterator = line.makeIterator()
        var parser = Unicode.UTF8.ForwardParser()
        var offset = 0
        decoding: while true {
            switch parser.parseScalar(from: &iterator) {
            case .valid(let scalar): offset += scalar.count
            case .error: return "byte \(offset + 1) is not valid UTF-8 (a manifest must be UTF-8 text)"
            case .emptyInput: break decoding
            }
        }
        if let nul = line.firstIndex(of: 0) { return "byte \(nul + 1) is a NUL character" }
        var depth = 0
        var keys = Set<[UInt8]>()
        var index = 0
        while index < line.count {
            let byte = line[index]
            if byte == UInt8(ascii: "{") || byte == UInt8(ascii: "[") { depth += 1 }
            if byte == UInt8(ascii: "}") || byte == UInt8(ascii: "]") { depth -= 1 }
            guard byte == UInt8(ascii: "\"") else { index += 1; continue }
            // A string: scan its escapes up to the closing quote.
            let start = index + 1
            index = start
            var pendingHigh = false
            while index < line.count && line[index] != UInt8(ascii: "\"") {
                guard line[index] == UInt8(ascii: "\\") else {
                    if pendingHigh { return "a string holds a lone surrogate (a \\uD800-\\uDBFF escape without its low half)" }
                    index += 1
                    continue
                }
                let escaped = index + 1 < line.count ? line[index + 1] : 0
                if escaped == UInt8(ascii: "u"), index + 6 <= line.count,
                   let unit = UInt16(String(decoding: line[index + 2 ..< index + 6], as: UTF8.self), radix: 16) {
                    if unit == 0 { return "a string holds a NUL character (\\u0000)" }
                    if (0xDC00...0xDFFF).contains(unit) {
                        if !pendingHigh { return "a string holds a lone surrogate (a \\uDC00-\\uDFFF escape without its high half)" }
                        pendingHigh = false
                    } else {
                        if pendingHigh { return "a string holds a lone surrogate (a \\uD800-\\uDBFF escape without its low half)" }
                        pendingHigh = (0xD800...0xDBFF).contains(unit)
                    }
                    index += 6
                } else {
                    if pendingHigh { return "a string holds a lone surrogate (a \\uD800-\\uDBFF escape without its low half)" }
                    index += 2
                }
            }
            if pendingHigh { return "a string holds a lone surrogate (a \\uD800-\\uDBFF escape without its low half)" }
            let end = min(index, line.count)
            index += 1
            // A string at depth 1 followed by a colon is a key of the top-level object.
            var next = index
            while next < line.count && (line[next] == 0x20 || line[next] == 0x09) { next += 1 }
            if depth == 1 && next < line.count && line[next] == UInt8(ascii: ":") {
                let key = Array(line[start ..< end])
                if !keys.insert(key).inserted { return "the key \"\(String(decoding: key, as: UTF8.self))\" is given twice" }
            }
        }
        return nil
    }
}
