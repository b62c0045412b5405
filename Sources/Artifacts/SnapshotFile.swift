import Crypto
import Foundation

/// What a snapshot belongs to: the model (by content) and the one job, of one queue, that wrote it, with the
/// inputs that job asked for. A snapshot is resumed only by the job it names, and only while all of these still
/// hold, so a reused id, a second queue sharing an output folder, a swapped file, a changed image or a retrained
/// model can never hand one job another's state.
public struct SnapshotIdentity: Sendable, Hashable {
    /// The model's content fingerprint (`ModelFingerprint.fingerprint`).
    public var model: String
    /// The queue's identity (a UUID) and the job's id in it.
    public var queue: String
    public var job: Int64
    /// sha256 (hex) of the image bytes the job was enqueued with.
    public var imageSHA256: String
    public var prompt: String
    /// The job's generation parameters as canonical JSON.
    public var parameters: String

    public init(model: String, queue: String, job: Int64, imageSHA256: String, prompt: String, parameters: String) {
        self.model = model
        self.queue = queue
        self.job = job
        self.imageSHA256 = imageSHA256
        self.prompt = prompt
        self.parameters = parameters
    }

    /// Why a snapshot with this identity cannot be resumed by `expected`, or nil when it can. The model is checked
    /// apart (`SnapshotFileError.differentModel`).
    func mismatch(expected: SnapshotIdentity) -> String? {
        if queue != expected.queue || job != expected.job {
            return "it was written for job \(job) of queue \(queue), not job \(expected.job) of queue \(expected.queue)"
        }
        if imageSHA256 != expected.imageSHA256 {
            return "it was taken for an image with sha256 \(imageSHA256), the job's image has \(expected.imageSHA256)"
        }
        if prompt != expected.prompt { return "it was taken for another prompt" }
        if parameters != expected.parameters { return "it was taken with parameters \(parameters), the job asks for \(expected.parameters)" }
        return nil
    }
}

/// KV-cache snapshot files: an engine's payload (opaque here) in a versioned, checksummed,
/// zstd-compressed envelope that names the model and the job it belongs to. Little-endian:
///
/// ```
/// offset  size  field (file format version 2)
/// 0       8     magic "DLLAVAKV"
/// 8       4     u32 file format version (2)
/// 12      4     u32 F, then F bytes: the model's content fingerprint, UTF-8
///         4     u32 Q, then Q bytes: the queue's identity (UUID), UTF-8
///         8     i64 job id
///         4     u32 S, then S bytes: the image's sha256 (hex), UTF-8
///         4     u32 P, then P bytes: the prompt, UTF-8
///         4     u32 J, then J bytes: the generation parameters (canonical JSON), UTF-8
///         8     u64 payload bytes (uncompressed)
///         32    sha256 of the uncompressed payload
///         8     u64 C = compressed bytes
///         C     one zstd frame holding the payload; nothing follows it
/// ```
///
/// Version 1 (no job identity) is no longer read: a version-1 file is refused like any unknown version and its
/// job restarts. A reader checks everything before it returns anything and never changes the file.
public enum SnapshotFile {
    public static let magic = Data("DLLAVAKV".utf8)
    public static let formatVersion: UInt32 = 2
    /// Payloads larger than this are refused on reading.
    public static let maxPayloadSize = 4 << 30

    /// A snapshot's header and its payload, checked.
    public struct Contents: Sendable, Equatable {
        public var formatVersion: UInt32
        public var identity: SnapshotIdentity
        public var modelFingerprint: String { identity.model }
        public var payloadSHA256: String
        /// Bytes of the whole file, and of the payload once decompressed.
        public var fileBytes: Int
        public var payloadBytes: Int
        public var payload: Data
    }

    /// The file's bytes for `payload`.
    public static func encode(_ payload: Data, identity: SnapshotIdentity, level: Int32 = 3) throws -> Data {
        let compressed = try Zstd.compress(payload, level: level)
        var data = magic
        append(formatVersion, to: &data)
        appendString(identity.model, to: &data)
        appendString(identity.queue, to: &data)
        append(identity.job, to: &data)
        appendString(identity.imageSHA256, to: &data)
        appendString(identity.prompt, to: &data)
        appendString(identity.parameters, to: &data)
        append(UInt64(payload.count), to: &data)
        data.append(contentsOf: SHA256.hash(data: payload))
        append(UInt64(compressed.count), to: &data)
        data.append(compressed)
        return data
    }

    /// Writes a snapshot atomically (a reader sees the previous snapshot or this one, never a part).
    @discardableResult
    public static func write(_ payload: Data, identity: SnapshotIdentity, to url: URL) throws -> AtomicFile.Written {
        do {
            return try AtomicFile.write(try encode(payload, identity: identity), to: url)
        } catch let error as ArtifactError {
            throw SnapshotFileError.unwritable(path: url.path, reason: error.description)
        }
    }

    /// Reads and checks a snapshot: magic, version, identity (when `expected` is given: the model first, then
    /// queue and job, image, prompt and parameters), length, decompression and checksum.
    public static func read(from url: URL, expected: SnapshotIdentity? = nil) throws(SnapshotFileError) -> Contents {
        let data: Data
        do { data = try Data(contentsOf: url) } catch {
            throw .unreadable(path: url.path, reason: (error as NSError).localizedFailureReason ?? error.localizedDescription)
        }
        return try decode(data, path: url.path, expected: expected)
    }

    /// Checks and unpacks a snapshot file's bytes; `path` names it in errors.
    public static func decode(_ data: Data, path: String, expected: SnapshotIdentity? = nil) throws(SnapshotFileError) -> Contents {
        let data = Data(data)
        guard data.count >= magic.count, data.prefix(magic.count) == magic else { throw .notASnapshot(path: path) }
        var offset = magic.count
        func take(_ count: Int) throws(SnapshotFileError) -> Data {
            guard count >= 0, data.count - offset >= count else { throw .truncated(path: path) }
            defer { offset += count }
            return data.subdata(in: offset ..< offset + count)
        }
        func integer<T: FixedWidthInteger>(_: T.Type) throws(SnapshotFileError) -> T {
            let bytes = try take(MemoryLayout<T>.size)
            return bytes.withUnsafeBytes { T(littleEndian: $0.loadUnaligned(as: T.self)) }
        }
        func string(_ field: String) throws(SnapshotFileError) -> String {
            // `take` checks the declared length against the bytes present before anything is allocated.
            guard let text = String(data: try take(Int(try integer(UInt32.self))), encoding: .utf8) else {
                throw .corrupt(path: path, reason: "the \(field) is not UTF-8")
            }
            return text
        }
        let version = try integer(UInt32.self)
        guard version == formatVersion else { throw .unsupportedVersion(path: path, version: version, supported: formatVersion) }
        let model = try string("model fingerprint")
        if let expected, model != expected.model {
            throw .differentModel(path: path, found: model, expected: expected.model)
        }
        let identity = SnapshotIdentity(model: model, queue: try string("queue identity"), job: try integer(Int64.self),
                                        imageSHA256: try string("image sha256"), prompt: try string("prompt"),
                                        parameters: try string("parameters"))
        if let expected, let reason = identity.mismatch(expected: expected) {
            throw .differentJob(path: path, reason: reason)
        }
        let payloadBytes = try integer(UInt64.self)
        let checksum = Checksum.hex(try take(32))
        let compressedBytes = try integer(UInt64.self)
        guard payloadBytes <= UInt64(maxPayloadSize) else {
            throw .corrupt(path: path, reason: "it declares a payload of \(payloadBytes) bytes, more than \(maxPayloadSize)")
        }
        guard compressedBytes <= UInt64(data.count - offset) else { throw .truncated(path: path) }
        guard compressedBytes == UInt64(data.count - offset) else {
            throw .corrupt(path: path, reason: "\(UInt64(data.count - offset) - compressedBytes) bytes follow the compressed payload")
        }
        let payload: Data
        do {
            payload = try Zstd.decompress(data.subdata(in: offset ..< data.count), maxSize: Int(payloadBytes))
        } catch ArtifactError.truncatedZstd {
            throw .truncated(path: path)
        } catch {
            throw .corrupt(path: path, reason: "\(error)")
        }
        guard payload.count == Int(payloadBytes) else {
            throw .corrupt(path: path, reason: "the payload has \(payload.count) bytes, the header says \(payloadBytes)")
        }
        let actual = Checksum.sha256Hex(payload)
        guard actual == checksum else { throw .checksumMismatch(path: path, expected: checksum, actual: actual) }
        return Contents(formatVersion: version, identity: identity, payloadSHA256: checksum, fileBytes: data.count,
                        payloadBytes: payload.count, payload: payload)
    }

    private static func appendString(_ text: String, to data: inout Data) {
        let bytes = Data(text.utf8)
        append(UInt32(bytes.count), to: &data)
        data.append(bytes)
    }

    private static func append<T: FixedWidthInteger>(_ value: T, to data: inout Data) {
        withUnsafeBytes(of: value.littleEndian) { data.append(contentsOf: $0) }
    }
}

/// Why a snapshot file was refused; each names the file.
public enum SnapshotFileError: Error, Sendable, Equatable, CustomStringConvertible {
    case unreadable(path: String, reason: String)
    case unwritable(path: String, reason: String)
    /// The file does not start with the snapshot magic.
    case notASnapshot(path: String)
    case unsupportedVersion(path: String, version: UInt32, supported: UInt32)
    /// The snapshot was taken with another model.
    case differentModel(path: String, found: String, expected: String)
    /// The snapshot belongs to another job (another id or queue), or its job's image, prompt or parameters differ.
    case differentJob(path: String, reason: String)
    /// The file ends before its header or its compressed payload does.
    case truncated(path: String)
    case checksumMismatch(path: String, expected: String, actual: String)
    case corrupt(path: String, reason: String)

    public var path: String {
        switch self {
        case let .unreadable(path, _), let .unwritable(path, _), let .notASnapshot(path), let .unsupportedVersion(path, _, _),
             let .differentModel(path, _, _), let .differentJob(path, _), let .truncated(path), let .checksumMismatch(path, _, _), let .corrupt(path, _):
            path
        }
    }

    public var description: String {
        switch self {
        case let .unreadable(path, reason): "cannot read the snapshot \(path): \(reason)"
        case let .unwritable(path, reason): "cannot write the snapshot \(path): \(reason)"
        case let .notASnapshot(path): "\(path) is not a dllava KV snapshot (bad magic)"
        case let .unsupportedVersion(path, version, supported):
            "\(path) is snapshot format version \(version); this build reads version \(supported)"
        case let .differentModel(path, found, expected):
            "\(path) was taken with model \(found), not the loaded model \(expected)"
        case let .differentJob(path, reason): "\(path) does not belong to this job: \(reason)"
        case let .truncated(path): "\(path) is truncated"
        case let .checksumMismatch(path, expected, actual):
            "\(path): the payload's sha256 is \(actual), not the recorded \(expected)"
        case let .corrupt(path, reason): "\(path) is a corrupt snapshot: \(reason)"
        }
    }
}
