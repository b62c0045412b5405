import Crypto
import Foundation

/// KV-cache snapshot files: an engine's payload (opaque here) in a versioned, checksummed,
/// zstd-compressed envelope that names the model it belongs to. Little-endian:
///
/// ```
/// offset  size  field
/// 0       8     magic "DLLAVAKV"
/// 8       4     u32 file format version (1)
/// 12      4     u32 F = length of the model fingerprint
/// 16      F     model fingerprint, UTF-8
/// 16+F    8     u64 payload bytes (uncompressed)
/// 24+F    32    sha256 of the uncompressed payload
/// 56+F    8     u64 C = compressed bytes
/// 64+F    C     one zstd frame holding the payload; nothing follows it
/// ```
///
/// A reader checks everything before it returns anything and never changes the file.
public enum SnapshotFile {
    public static let magic = Data("DLLAVAKV".utf8)
    public static let formatVersion: UInt32 = 1
    /// Payloads larger than this are refused on reading.
    public static let maxPayloadSize = 4 << 30

    /// A snapshot's header and its payload, checked.
    public struct Contents: Sendable, Equatable {
        public var formatVersion: UInt32
        public var modelFingerprint: String
        public var payloadSHA256: String
        /// Bytes of the whole file, and of the payload once decompressed.
        public var fileBytes: Int
        public var payloadBytes: Int
        public var payload: Data
    }

    /// The file's bytes for `payload`.
    public static func encode(_ payload: Data, modelFingerprint: String, level: Int32 = 3) throws -> Data {
        let compressed = try Zstd.compress(payload, level: level)
        var data = magic
        append(formatVersion, to: &data)
        let fingerprint = Data(modelFingerprint.utf8)
        append(UInt32(fingerprint.count), to: &data)
        data.append(fingerprint)
        append(UInt64(payload.count), to: &data)
        data.append(contentsOf: SHA256.hash(data: payload))
        append(UInt64(compressed.count), to: &data)
        data.append(compressed)
        return data
    }

    /// Writes a snapshot atomically (a reader sees the previous snapshot or this one, never a part).
    @discardableResult
    public static func write(_ payload: Data, modelFingerprint: String, to url: URL) throws -> AtomicFile.Written {
        do {
            return try AtomicFile.write(try encode(payload, modelFingerprint: modelFingerprint), to: url)
        } catch let error as ArtifactError {
            throw SnapshotFileError.unwritable(path: url.path, reason: error.description)
        }
    }

    /// Reads and checks a snapshot: magic, version, model (when `expectedModel` is given), length,
    /// decompression and checksum.
    public static func read(from url: URL, expectedModel: String? = nil) throws(SnapshotFileError) -> Contents {
        let data: Data
        do { data = try Data(contentsOf: url) } catch {
            throw .unreadable(path: url.path, reason: (error as NSError).localizedFailureReason ?? error.localizedDescription)
        }
        return try decode(data, path: url.path, expectedModel: expectedModel)
    }

    /// Checks and unpacks a snapshot file's bytes; `path` names it in errors.
    public static func decode(_ data: Data, path: String, expectedModel: String? = nil) throws(SnapshotFileError) -> Contents {
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
        let version = try integer(UInt32.self)
        guard version == formatVersion else { throw .unsupportedVersion(path: path, version: version, supported: formatVersion) }
        let fingerprintBytes = try take(Int(try integer(UInt32.self)))
        guard let fingerprint = String(data: fingerprintBytes, encoding: .utf8) else {
            throw .corrupt(path: path, reason: "the model fingerprint is not UTF-8")
        }
        if let expectedModel, fingerprint != expectedModel {
            throw .differentModel(path: path, found: fingerprint, expected: expectedModel)
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
        return Contents(formatVersion: version, modelFingerprint: fingerprint, payloadSHA256: checksum, fileBytes: data.count,
                        payloadBytes: payload.count, payload: payload)
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
    /// The file ends before its header or its compressed payload does.
    case truncated(path: String)
    case checksumMismatch(path: String, expected: String, actual: String)
    case corrupt(path: String, reason: String)

    public var path: String {
        switch self {
        case let .unreadable(path, _), let .unwritable(path, _), let .notASnapshot(path), let .unsupportedVersion(path, _, _),
             let .differentModel(path, _, _), let .truncated(path), let .checksumMismatch(path, _, _), let .corrupt(path, _):
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
        case let .truncated(path): "\(path) is truncated"
        case let .checksumMismatch(path, expected, actual):
            "\(path): the payload's sha256 is \(actual), not the recorded \(expected)"
        case let .corrupt(path, reason): "\(path) is a corrupt snapshot: \(reason)"
        }
    }
}
