import Foundation

/// Why a tokenizer file could not be loaded. The description always names the file.
public struct TokenizerError: Error, CustomStringConvertible, Sendable, Equatable {
    public enum Kind: Sendable, Equatable {
        /// The file could not be read (missing, permissions, a directory).
        case unreadable
        /// The bytes are not a well-formed file of the expected format (truncated protobuf, bad JSON,
        /// inconsistent contents, required fields missing).
        case malformed
        /// Well-formed, but uses a feature this implementation does not reproduce (unigram models,
        /// a non-identity normalization charsmap, unknown HF normalizers or pre-tokenizers).
        case unsupported
        /// The file name is neither `tokenizer.model` nor `*.json`, or a directory holds neither.
        case unknownFormat
    }

    public let kind: Kind
    /// The file (or directory) concerned.
    public let file: URL
    /// What is wrong, in words.
    public let reason: String

    public init(_ kind: Kind, file: URL, _ reason: String) {
        self.kind = kind
        self.file = file
        self.reason = reason
    }

    public var description: String {
        let what: String
        switch kind {
        case .unreadable: what = "cannot read"
        case .malformed: what = "malformed tokenizer file"
        case .unsupported: what = "unsupported tokenizer"
        case .unknownFormat: what = "unknown tokenizer format"
        }
        return "\(what) \(file.path): \(reason)"
    }
}
