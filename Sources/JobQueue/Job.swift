import Foundation
import GRDB

/// Where a job is in its life. `succeeded`, `failed` and `cancelled` are final: `finalized_at` is set
/// exactly on them (the table's CHECK constraint holds the queue to it).
public enum JobState: String, CaseIterable, Codable, Sendable, Comparable {
    case available, running, retryable, succeeded, failed, cancelled

    public var isFinal: Bool { self == .succeeded || self == .failed || self == .cancelled }
    /// States a worker may claim from.
    public var isClaimable: Bool { self == .available || self == .retryable }

    public static func < (a: JobState, b: JobState) -> Bool {
        allCases.firstIndex(of: a)! < allCases.firstIndex(of: b)!
    }
}

/// The generation parameters a job asks for, as JSONL and CSV manifests spell them. `nil` means "the
/// engine's default", so two jobs that differ only in spelling a default explicitly are different jobs;
/// the canonical JSON (sorted keys, absent fields omitted) is what the idempotency key hashes.
///
/// The one schema of the parameters: `schema` lists each field once (key, type, what a bad value is called), and
/// decoding (the job row's JSON, a JSONL line, a CSV row whose cells arrive as text) and `overridden(by:)` go
/// through it.
public struct JobParameters: Codable, Sendable, Hashable {
    /// Dynamic-LLaVA's sparsification modes (docs/DYNAMIC_LLAVA.md section 4, `generate --sparsity`).
    public enum Sparsity: String, Codable, Sendable, CaseIterable {
        case dynamic, full, fastv, random
    }

    public var maxTokens: Int?
    public var temperature: Double?
    public var topP: Double?
    public var topK: Int?
    public var seed: UInt64?
    public var stop: [String]?
    public var sparsity: Sparsity?
    public var visionKeepRate: Double?

    public init(maxTokens: Int? = nil, temperature: Double? = nil, topP: Double? = nil, topK: Int? = nil,
                seed: UInt64? = nil, stop: [String]? = nil, sparsity: Sparsity? = nil, visionKeepRate: Double? = nil) {
        self.maxTokens = maxTokens
        self.temperature = temperature
        self.topP = topP
        self.topK = topK
        self.seed = seed
        self.stop = stop
        self.sparsity = sparsity
        self.visionKeepRate = visionKeepRate
    }

    enum CodingKeys: String, CodingKey, CaseIterable {
        case maxTokens = "max_tokens", temperature, topP = "top_p", topK = "top_k", seed, stop, sparsity
        case visionKeepRate = "vision_keep_rate"
    }

    /// Fields of `other` that are set replace ours (manifest line over command-line defaults).
    public func overridden(by other: JobParameters) -> JobParameters {
        var result = self
        for field in Self.schema { field.override(&result, other) }
        return result
    }

    /// Every field, once: how it decodes and how a set value overrides.
    static let schema: [ParameterField] = [
        .scalar(.maxTokens, \.maxTokens, "an integer"),
        .scalar(.temperature, \.temperature, "a number"),
        .scalar(.topP, \.topP, "a number"),
        .scalar(.topK, \.topK, "an integer"),
        .scalar(.seed, \.seed, "an integer from 0 to 2^64-1"),
        .stopStrings,
        .sparsityMode,
        .scalar(.visionKeepRate, \.visionKeepRate, "a number"),
    ]

    /// Set to true in a decoder's `userInfo` when every value arrives as text (CSV cells): numbers are then parsed
    /// from the text, as a JSON reader would read the same digits.
    public static let textValuesKey = CodingUserInfoKey(rawValue: "dllava.job-parameters.text-values")!

    /// A value that does not fit its field; `reason` names the field (e.g. "temperature must be a number").
    public struct FieldError: Error, Sendable, Equatable {
        public var reason: String
    }

    /// Decodes through `schema`; keys that are not parameters are left for the caller (a manifest line has more).
    public init(from decoder: Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        let text = decoder.userInfo[Self.textValuesKey] as? Bool == true
        self.init()
        for field in Self.schema { try field.decode(&self, container, text) }
    }

    static func sparsityMessage(_ text: String) -> String {
        "sparsity must be one of \(Sparsity.allCases.map(\.rawValue).joined(separator: ", ")), not '\(text)'"
    }

    /// Why these parameters cannot be run, or nil when they can.
    public func problem() -> String? {
        if let maxTokens, maxTokens < 1 { return "max_tokens must be at least 1" }
        if let temperature, !(temperature >= 0 && temperature.isFinite) { return "temperature must be a finite number >= 0" }
        if let topP, !(topP > 0 && topP <= 1) { return "top_p must be in (0, 1]" }
        if let topK, topK < 0 { return "top_k must not be negative" }
        if let visionKeepRate, !(visionKeepRate > 0 && visionKeepRate <= 1) { return "vision_keep_rate must be in (0, 1]" }
        if let stop, stop.contains(where: \.isEmpty) { return "stop strings must not be empty" }
        return nil
    }

    /// Sorted keys, no whitespace, absent fields omitted: the form stored in `job.params` and hashed.
    public func canonicalJSON() -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        // Encoding plain numbers, strings and arrays cannot fail.
        return String(decoding: try! encoder.encode(self), as: UTF8.self)
    }

    public static func decode(canonicalJSON text: String) throws -> JobParameters {
        try JSONDecoder().decode(JobParameters.self, from: Data(text.utf8))
    }
}

/// One field of `JobParameters.schema`.
struct ParameterField: Sendable {
    typealias Container = KeyedDecodingContainer<JobParameters.CodingKeys>
    let key: JobParameters.CodingKeys
    let decode: @Sendable (inout JobParameters, Container, _ text: Bool) throws -> Void
    let override: @Sendable (inout JobParameters, JobParameters) -> Void

    /// Whether `key` holds a value (JSON null and absence are "not given").
    static func isGiven(_ key: JobParameters.CodingKeys, in container: Container) throws -> Bool {
        try container.contains(key) && !container.decodeNil(forKey: key)
    }

    /// A number field: a JSON number, or a cell whose text parses as one.
    static func scalar<T: Decodable & LosslessStringConvertible & Sendable>(
        _ key: JobParameters.CodingKeys, _ path: WritableKeyPath<JobParameters, T?> & Sendable, _ what: String) -> ParameterField {
        ParameterField(key: key, decode: { parameters, container, text in
            guard try isGiven(key, in: container) else { return }
            if text {
                let cell = try container.decode(String.self, forKey: key)
                guard let value = T(cell.trimmingCharacters(in: .whitespaces)) else {
                    throw JobParameters.FieldError(reason: "\(key.stringValue) must be \(what), not '\(cell)'")
                }
                parameters[keyPath: path] = value
            } else {
                do { parameters[keyPath: path] = try container.decode(T.self, forKey: key) } catch {
                    throw JobParameters.FieldError(reason: "\(key.stringValue) must be \(what)")
                }
            }
        }, override: { parameters, other in
            if let value = other[keyPath: path] { parameters[keyPath: path] = value }
        })
    }

    /// `stop`: a string or a list of strings in JSON; one string in a cell.
    static let stopStrings = ParameterField(key: .stop, decode: { parameters, container, _ in
        guard try isGiven(.stop, in: container) else { return }
        if let single = try? container.decode(String.self, forKey: .stop) {
            parameters.stop = [single]
        } else {
            do { parameters.stop = try container.decode([String].self, forKey: .stop) } catch {
                throw JobParameters.FieldError(reason: "stop must be a string or a list of strings")
            }
        }
    }, override: { parameters, other in
        if let value = other.stop { parameters.stop = value }
    })

    /// `sparsity`: one of the mode names.
    static let sparsityMode = ParameterField(key: .sparsity, decode: { parameters, container, _ in
        guard try isGiven(.sparsity, in: container) else { return }
        let text: String
        do { text = try container.decode(String.self, forKey: .sparsity) } catch {
            throw JobParameters.FieldError(reason: "sparsity must be a string")
        }
        guard let mode = JobParameters.Sparsity(rawValue: text) else { throw JobParameters.FieldError(reason: JobParameters.sparsityMessage(text)) }
        parameters.sparsity = mode
    }, override: { parameters, other in
        if let value = other.sparsity { parameters.sparsity = value }
    })
}

/// What a worker measured while running a job (milliseconds unless named otherwise); stored as JSON in
/// `job.timings` so `status` and `show` can report it without opening the result file.
public struct JobTimings: Codable, Sendable, Hashable {
    public var prefillMs: Double?
    public var decodeMs: Double?
    public var totalMs: Double?
    public var generatedTokens: Int?

    public init(prefillMs: Double? = nil, decodeMs: Double? = nil, totalMs: Double? = nil, generatedTokens: Int? = nil) {
        self.prefillMs = prefillMs
        self.decodeMs = decodeMs
        self.totalMs = totalMs
        self.generatedTokens = generatedTokens
    }

    enum CodingKeys: String, CodingKey {
        case prefillMs = "prefill_ms", decodeMs = "decode_ms", totalMs = "total_ms", generatedTokens = "generated_tokens"
    }
}

/// A job to add to the queue. The idempotency key is `custom_id:<custom id>` when a custom id is given, else
/// `sha256:<hex>` of the image's sha256, the prompt and the canonical parameter JSON (see `contentKey`).
public struct NewJob: Sendable, Hashable {
    public var customID: String?
    public var imagePath: String
    public var imageSHA256: String
    public var prompt: String
    public var parameters: JobParameters
    public var priority: Int
    public var maxAttempts: Int
    /// Unix milliseconds before which the job is not claimed; nil means "now".
    public var runAt: Int64?

    public init(customID: String? = nil, imagePath: String, imageSHA256: String, prompt: String,
                parameters: JobParameters = JobParameters(), priority: Int = 0, maxAttempts: Int = 3, runAt: Int64? = nil) {
        self.customID = customID
        self.imagePath = imagePath
        self.imageSHA256 = imageSHA256
        self.prompt = prompt
        self.parameters = parameters
        self.priority = priority
        self.maxAttempts = maxAttempts
        self.runAt = runAt
    }

    public var idempotencyKey: String {
        if let customID { return "custom_id:" + customID }
        return Self.contentKey(imageSHA256: imageSHA256, prompt: prompt, parameters: parameters)
    }

    /// `sha256:` + hex sha256 of `<image sha256 hex> NUL <prompt> NUL <canonical parameters JSON>`: the same
    /// image bytes asked the same question with the same parameters is the same job, wherever the file lives.
    public static func contentKey(imageSHA256: String, prompt: String, parameters: JobParameters) -> String {
        contentKey(imageSHA256: imageSHA256, prompt: prompt, canonicalParameters: parameters.canonicalJSON())
    }

    static func contentKey(imageSHA256: String, prompt: String, canonicalParameters: String) -> String {
        var bytes = Data(imageSHA256.utf8)
        bytes.append(0)
        bytes.append(contentsOf: Data(prompt.utf8))
        bytes.append(0)
        bytes.append(contentsOf: Data(canonicalParameters.utf8))
        return "sha256:" + Hashing.sha256Hex(bytes)
    }
}

/// One row of the `job` table.
public struct Job: Sendable, Hashable, Identifiable, FetchableRecord {
    public var id: Int64
    public var customID: String?
    public var idempotencyKey: String
    public var imagePath: String
    public var imageSHA256: String
    public var prompt: String
    public var parameters: JobParameters
    /// Lower runs first.
    public var priority: Int
    public var state: JobState
    /// How many times the job has been claimed; also the fencing token `complete` and `fail` must quote.
    public var attempt: Int
    public var maxAttempts: Int
    public var runAt: Int64
    public var leaseOwner: String?
    public var leaseExpiresAt: Int64?
    public var heartbeatAt: Int64?
    /// Set by `cancel` on a running job; the worker reads it between decode steps and calls `cancelled`.
    public var cancelRequested: Bool
    /// The last failure's reason (kept while retrying, so `show` says why a job is waiting).
    public var error: String?
    public var outputPath: String?
    public var outputSHA256: String?
    public var timings: JobTimings?
    public var createdAt: Int64
    public var updatedAt: Int64
    /// When the current (or last) attempt was claimed.
    public var startedAt: Int64?
    public var finalizedAt: Int64?
    /// Where the job's KV snapshot was last written (the file is deleted when the job finishes, unless kept).
    public var snapshotPath: String?
    /// The most progress its workers have reported (`JobProgress.reached`). Only ever raised.
    public var progress: Int64
    /// `progress` when the current (or last) attempt was claimed.
    public var progressAtClaim: Int64
    /// The most progress its stored snapshots hold (`JobProgress.saved`). Only ever raised.
    public var savedProgress: Int64
    /// `savedProgress` when the current (or last) attempt was claimed. A worker that dies after raising either figure
    /// past its value at the claim costs the job no attempt.
    public var savedProgressAtClaim: Int64
    /// Worker deaths in a row at which the job made no progress (reset by progress, and by `retry`).
    public var deathsWithoutProgress: Int

    public init(id: Int64, customID: String?, idempotencyKey: String, imagePath: String, imageSHA256: String, prompt: String,
                parameters: JobParameters, priority: Int, state: JobState, attempt: Int, maxAttempts: Int, runAt: Int64,
                leaseOwner: String?, leaseExpiresAt: Int64?, heartbeatAt: Int64?, cancelRequested: Bool, error: String?,
                outputPath: String?, outputSHA256: String?, timings: JobTimings?, createdAt: Int64, updatedAt: Int64,
                startedAt: Int64?, finalizedAt: Int64?, snapshotPath: String?, progress: Int64 = 0, progressAtClaim: Int64 = 0,
                savedProgress: Int64 = 0, savedProgressAtClaim: Int64 = 0, deathsWithoutProgress: Int = 0) {
        self.id = id
        self.customID = customID
        self.idempotencyKey = idempotencyKey
        self.imagePath = imagePath
        self.imageSHA256 = imageSHA256
        self.prompt = prompt
        self.parameters = parameters
        self.priority = priority
        self.state = state
        self.attempt = attempt
        self.maxAttempts = maxAttempts
        self.runAt = runAt
        self.leaseOwner = leaseOwner
        self.leaseExpiresAt = leaseExpiresAt
        self.heartbeatAt = heartbeatAt
        self.cancelRequested = cancelRequested
        self.error = error
        self.outputPath = outputPath
        self.outputSHA256 = outputSHA256
        self.timings = timings
        self.createdAt = createdAt
        self.updatedAt = updatedAt
        self.startedAt = startedAt
        self.finalizedAt = finalizedAt
        self.snapshotPath = snapshotPath
        self.progress = progress
        self.progressAtClaim = progressAtClaim
        self.savedProgress = savedProgress
        self.savedProgressAtClaim = savedProgressAtClaim
        self.deathsWithoutProgress = deathsWithoutProgress
    }

    public init(row: Row) throws {
        id = row["id"]
        customID = row["custom_id"]
        idempotencyKey = row["idempotency_key"]
        imagePath = row["image_path"]
        imageSHA256 = row["image_sha256"]
        prompt = row["prompt"]
        let params: String = row["params"]
        parameters = try JobParameters.decode(canonicalJSON: params)
        priority = row["priority"]
        let stateName: String = row["state"]
        guard let state = JobState(rawValue: stateName) else {
            throw JobQueueError.corruptRow(id: row["id"], reason: "unknown state '\(stateName)'")
        }
        self.state = state
        attempt = row["attempt"]
        maxAttempts = row["max_attempts"]
        runAt = row["run_at"]
        leaseOwner = row["lease_owner"]
        leaseExpiresAt = row["lease_expires_at"]
        heartbeatAt = row["heartbeat_at"]
        cancelRequested = row["cancel_requested"]
        error = row["error"]
        outputPath = row["output_path"]
        outputSHA256 = row["output_sha256"]
        let timingsJSON: String? = row["timings"]
        timings = try timingsJSON.map { try JSONDecoder().decode(JobTimings.self, from: Data($0.utf8)) }
        createdAt = row["created_at"]
        updatedAt = row["updated_at"]
        startedAt = row["started_at"]
        finalizedAt = row["finalized_at"]
        snapshotPath = row["snapshot_path"]
        progress = row["progress"]
        progressAtClaim = row["progress_at_claim"]
        savedProgress = row["saved_progress"]
        savedProgressAtClaim = row["saved_progress_at_claim"]
        deathsWithoutProgress = row["deaths_without_progress"]
    }
}

/// A job as `show --json` and `list --json` print it: the table's column names, absent values left out.
extension Job: Encodable {
    enum CodingKeys: String, CodingKey {
        case id, customID = "custom_id", idempotencyKey = "idempotency_key", imagePath = "image_path"
        case imageSHA256 = "image_sha256", prompt, parameters = "params", priority, state, attempt
        case maxAttempts = "max_attempts", runAt = "run_at", leaseOwner = "lease_owner", leaseExpiresAt = "lease_expires_at"
        case heartbeatAt = "heartbeat_at", cancelRequested = "cancel_requested", error, outputPath = "output_path"
        case outputSHA256 = "output_sha256", timings, createdAt = "created_at", updatedAt = "updated_at"
        case startedAt = "started_at", finalizedAt = "finalized_at", snapshotPath = "snapshot_path"
        case progress, progressAtClaim = "progress_at_claim", savedProgress = "saved_progress"
        case savedProgressAtClaim = "saved_progress_at_claim", deathsWithoutProgress = "deaths_without_progress"
    }
}
