import Foundation

/// Which model produced a result: enough to tell results of different checkpoints apart.
public struct ModelFingerprint: Codable, Sendable, Hashable {
    /// A digest of the checkpoint's configuration and weights, as the engine computes it.
    public var fingerprint: String
    public var name: String?

    public init(fingerprint: String, name: String? = nil) {
        self.fingerprint = fingerprint
        self.name = name
    }
}

/// Wall-clock times of the attempt that produced a result, Unix milliseconds.
public struct ResultTimings: Codable, Sendable, Hashable {
    public var enqueuedAt: Int64?
    public var startedAt: Int64
    public var finishedAt: Int64

    public init(enqueuedAt: Int64? = nil, startedAt: Int64, finishedAt: Int64) {
        self.enqueuedAt = enqueuedAt
        self.startedAt = startedAt
        self.finishedAt = finishedAt
    }

    enum CodingKeys: String, CodingKey {
        case enqueuedAt = "enqueued_at", startedAt = "started_at", finishedAt = "finished_at"
    }
}

/// The result of one job, stored as zstd-compressed JSON (`zstd -d` reads it). Generic over the parameter and
/// statistics types so this target needs neither the queue nor the engine; readers that only want the text
/// decode `ResultSummary`.
///
/// Format version 1 (never edited): `format_version`, `job_id`, `attempt`, `custom_id` (absent when none), `text`,
/// `token_ids`, `finish_reason`, `parameters`, `stats`, `model` (`fingerprint`, `name`), `timings` (`enqueued_at`,
/// `started_at`, `finished_at`). Version 2 adds `queue_id`, the identity of the queue whose job this
/// is, so a file names its job even outside its queue's folder. Version 3 (written now) may carry
/// `stats.kept_image_indices`, the image tokens a Dynamic-LLaVA job kept (for `dllava report`); the envelope is
/// version 2's. Readers take all three.
public struct ResultRecord<Parameters: Codable & Sendable, Stats: Codable & Sendable>: Codable, Sendable {
    public var formatVersion: Int
    /// The queue's identity (absent in version 1 files).
    public var queueID: String?
    public var jobID: Int64
    public var attempt: Int
    public var customID: String?
    public var text: String
    public var tokenIDs: [Int32]
    public var finishReason: String
    public var parameters: Parameters
    public var stats: Stats
    public var model: ModelFingerprint
    public var timings: ResultTimings

    public init(queueID: String, jobID: Int64, attempt: Int, customID: String?, text: String, tokenIDs: [Int32], finishReason: String,
                parameters: Parameters, stats: Stats, model: ModelFingerprint, timings: ResultTimings) {
        formatVersion = ResultFile.formatVersion
        self.queueID = queueID
        self.jobID = jobID
        self.attempt = attempt
        self.customID = customID
        self.text = text
        self.tokenIDs = tokenIDs
        self.finishReason = finishReason
        self.parameters = parameters
        self.stats = stats
        self.model = model
        self.timings = timings
    }

    enum CodingKeys: String, CodingKey {
        case formatVersion = "format_version", queueID = "queue_id", jobID = "job_id", attempt, customID = "custom_id", text
        case tokenIDs = "token_ids", finishReason = "finish_reason", parameters, stats, model, timings
    }
}

/// The fields of a result file that `export` needs, whatever the parameter and statistics types.
public struct ResultSummary: Decodable, Sendable, Hashable {
    public var formatVersion: Int
    /// Absent in version 1 files.
    public var queueID: String?
    public var jobID: Int64
    public var customID: String?
    public var text: String
    public var finishReason: String

    enum CodingKeys: String, CodingKey {
        case formatVersion = "format_version", queueID = "queue_id", jobID = "job_id", customID = "custom_id", text, finishReason = "finish_reason"
    }
}

/// Writing and reading result files: `<directory>/<job id>-<attempt>.json.zst`. Each attempt has its own name,
/// so a late write from an attempt whose lease was rescued can never replace the file (and checksum) that the
/// accepted attempt recorded.
public struct ResultFile: Sendable {
    /// The version written; every version from 1 up to it is read.
    public static let formatVersion = 3
    /// Results larger than this are refused on reading (a guard against a corrupt or hostile size).
    public static let maxDecompressedSize = 256 << 20

    public let directory: URL

    /// Creates `directory` (and its parents) when missing; refuses one that is not a folder (`OutputPath`).
    public init(directory: URL) throws {
        try OutputPath.makeDirectory(directory)
        self.directory = directory
    }

    public func url(job: Int64, attempt: Int) -> URL {
        directory.appendingPathComponent("\(job)-\(attempt).json.zst")
    }

    /// The job id and attempt a result file's name (`<job id>-<attempt>.json.zst`) gives, or nil for other names.
    public static func parseName(_ name: String) -> (job: Int64, attempt: Int)? {
        guard name.hasSuffix(".json.zst") else { return nil }
        let parts = name.dropLast(".json.zst".count).split(separator: "-", omittingEmptySubsequences: false)
        guard parts.count == 2, let job = Int64(parts[0]), let attempt = Int(parts[1]), job > 0, attempt > 0 else { return nil }
        return (job, attempt)
    }

    /// `record` as stored: JSON with sorted keys, zstd-compressed (the bytes of a result file, and of a result stored in
    /// the queue's database).
    public static func encode<P, S>(_ record: ResultRecord<P, S>, level: Int32 = 3) throws -> Data {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return try Zstd.compress(try encoder.encode(record), level: level)
    }

    /// Encodes, compresses and writes `record` atomically; returns the path and the sha256 of the compressed bytes on
    /// disk, which is what the job row records.
    public func write<P, S>(_ record: ResultRecord<P, S>, level: Int32 = 3) throws -> AtomicFile.Written {
        let url = url(job: record.jobID, attempt: record.attempt)
        do {
            return try AtomicFile.write(try Self.encode(record, level: level), to: url)
        } catch let error as ArtifactError {
            throw ArtifactError.inFile(path: url.path, error)
        }
    }

    /// Reads a result file, checking its sha256 against `expectedSHA256` when given, and its format version.
    public static func read<R: Decodable>(_ type: R.Type, from url: URL, expectedSHA256: String? = nil) throws -> R {
        let compressed: Data
        do { compressed = try Data(contentsOf: url) } catch {
            throw ArtifactError.io(path: url.path, operation: "read", reason: (error as NSError).localizedFailureReason ?? "\(error.localizedDescription)")
        }
        return try decode(type, from: compressed, path: url.path, expectedSHA256: expectedSHA256)
    }

    /// Decodes stored result bytes (`path` names where they came from in errors), checking their sha256 against
    /// `expectedSHA256` when given, and their format version.
    public static func decode<R: Decodable>(_ type: R.Type, from compressed: Data, path: String, expectedSHA256: String? = nil) throws -> R {
        if let expectedSHA256 {
            let actual = Checksum.sha256Hex(compressed)
            guard actual == expectedSHA256 else {
                throw ArtifactError.checksumMismatch(path: path, expected: expectedSHA256, actual: actual)
            }
        }
        let json: Data
        do { json = try Zstd.decompress(compressed, maxSize: maxDecompressedSize) } catch let error as ArtifactError {
            throw ArtifactError.inFile(path: path, error)
        }
        let version: Int
        do { version = try JSONDecoder().decode(FormatVersion.self, from: json).format_version } catch {
            throw ArtifactError.malformedResult(path: path, reason: "no format_version")
        }
        guard (1...formatVersion).contains(version) else {
            throw ArtifactError.unsupportedFormatVersion(path: path, version: version, supported: formatVersion)
        }
        do { return try JSONDecoder().decode(R.self, from: json) } catch {
            throw ArtifactError.malformedResult(path: path, reason: describe(error))
        }
    }

    private struct FormatVersion: Decodable { let format_version: Int }

    static func describe(_ error: Error) -> String {
        switch error {
        case let DecodingError.keyNotFound(key, _): "no \(key.stringValue)"
        case let DecodingError.typeMismatch(_, context), let DecodingError.valueNotFound(_, context):
            "\(context.codingPath.map(\.stringValue).joined(separator: ".")) has the wrong type"
        default: "not valid JSON"
        }
    }
}
