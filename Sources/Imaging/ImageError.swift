/// Why an image file could not be turned into pixels. Every case names the file, so a bulk job's
/// log says which input was bad and how.
public struct ImageError: Error, CustomStringConvertible, Equatable, Sendable {
    public enum Kind: Equatable, Sendable {
        /// The file has no bytes.
        case empty
        /// The file starts like a JPEG or PNG but its data stops early.
        case truncated
        /// The bytes are not a known image format (for example a text file named `.jpg`).
        case notAnImage
        /// A recognised image format this decoder does not read (GIF, TIFF, WebP, BMP, ...).
        case unsupportedFormat(String)
        /// The header declares more pixels than `ImageDecoder.Options.maxPixels`; nothing was
        /// allocated for them.
        case tooLarge(width: Int, height: Int, maxPixels: Int)
        /// The file is the named format but its contents are invalid; the detail comes from the
        /// codec.
        case corrupt(String)
        /// The file could not be read (missing, a directory, permission, too big to read).
        case unreadable(String)
    }

    /// The file as the caller named it (a path, or the `name` given to `decode(data:name:)`).
    public let file: String
    public let kind: Kind

    public init(file: String, kind: Kind) {
        self.file = file
        self.kind = kind
    }

    /// The process exit status a command-line tool reports for this error (sysexits.h):
    /// 66 `EX_NOINPUT` when the file cannot be read, otherwise 65 `EX_DATAERR`.
    public var exitCode: Int32 {
        if case .unreadable = kind { return 66 }
        return 65
    }

    public var description: String {
        switch kind {
        case .empty: return "\(file): empty file (0 bytes)"
        case .truncated: return "\(file): truncated image (the data ends early)"
        case .notAnImage: return "\(file): not an image (no JPEG or PNG signature)"
        case .unsupportedFormat(let format): return "\(file): unsupported image format \(format) (only JPEG and PNG are read)"
        case let .tooLarge(width, height, maxPixels):
            return "\(file): image too large: \(width)x\(height) = \(width * height) pixels, limit \(maxPixels)"
        case .corrupt(let detail): return "\(file): corrupt image: \(detail)"
        case .unreadable(let detail): return "\(file): cannot read file: \(detail)"
        }
    }
}
