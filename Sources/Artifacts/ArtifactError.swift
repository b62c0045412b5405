import Foundation

/// Failures reading or writing artifacts, each one sentence naming what went wrong.
public indirect enum ArtifactError: Error, Sendable, Equatable, CustomStringConvertible {
    /// libzstd reported an error (`reason` is ZSTD_getErrorName's text).
    case zstd(operation: String, reason: String)
    /// The input ended in the middle of a zstd frame.
    case truncatedZstd
    /// Decompressing would produce more than `limit` bytes.
    case decompressedSizeLimit(limit: Int)
    /// A system call failed (`errno`'s text in `reason`).
    case io(path: String, operation: String, reason: String)
    case checksumMismatch(path: String, expected: String, actual: String)
    case unsupportedFormatVersion(path: String, version: Int, supported: Int)
    case malformedResult(path: String, reason: String)
    /// `OutputPath` refused to write at `path`; `reason` is a predicate ("is a FIFO, not a regular file").
    case refusedOutput(path: String, reason: String)
    /// `underlying`, while working on the file at `path`.
    case inFile(path: String, ArtifactError)

    public var description: String {
        switch self {
        case let .zstd(operation, reason): "zstd \(operation) failed: \(reason)"
        case .truncatedZstd: "the zstd data is truncated (it ends inside a frame)"
        case let .decompressedSizeLimit(limit): "the zstd data decompresses to more than \(limit) bytes"
        case let .io(path, operation, reason): "\(operation) \(path) failed: \(reason)"
        case let .checksumMismatch(path, expected, actual): "\(path) has sha256 \(actual), not the recorded \(expected)"
        case let .unsupportedFormatVersion(path, version, supported):
            "\(path) is result format version \(version); this build reads versions 1 to \(supported)"
        case let .malformedResult(path, reason): "\(path) is not a valid result file: \(reason)"
        case let .refusedOutput(path, reason): "\(path) \(reason); nothing was written there"
        case let .inFile(path, error): "\(path): \(error)"
        }
    }

    static func posix(_ operation: String, _ path: String, errno code: Int32 = errno) -> ArtifactError {
        .io(path: path, operation: operation, reason: String(cString: strerror(code)))
    }
}
