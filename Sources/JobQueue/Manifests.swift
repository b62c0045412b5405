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

    /// Enqueues the pending jobs, one transaction per `jobQueueChunkSize`, so that when a write fails the count of
    /// jobs committed before it is exact.
    mutating func flush() throws {
        var start = 0
        while start < pending.count {
            let end = min(start + jobQueueChunkSize, pending.count)
            let result: EnqueueResult
            do {
                result = try queue.enqueue(Array(pending[start ..< end]))
            } catch {
                throw ManifestInterrupted(file: file, inserted: report.inserted, alreadyPresent: report.alreadyPresent, underlying: error)
            }
            report.inserted += result.inserted.count
            report.alreadyPresent += result.alreadyPresent.count
            for conflict in result.conflicts {
                let index = start + conflict.index
                report(line: pendingLines[index], "custom_id '\(pending[index].customID ?? "")' is already queued as job "
                       + "\(conflict.existingID) with another image, prompt or parameters; this line is not enqueued (give it its own custom_id)")
            }
            start = end
        }
        pending.removeAll(keepingCapacity: true)
        pendingLines.removeAll(keepingCapacity: true)
    }

    mutating func finish() throws -> ManifestReport {
        try flush()
        return report
    }
}
