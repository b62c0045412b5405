import Crypto
import Foundation

/// SHA-256 as lowercase hex, for image files and idempotency keys.
enum Hashing {
    static func sha256Hex(_ data: Data) -> String {
        hex(SHA256.hash(data: data))
    }

    /// Streams the file in 1 MiB pieces, so a large image is never held whole. Only a regular file is read: it is
    /// opened without blocking (opening a FIFO for reading would otherwise wait for a writer forever) and anything
    /// that is not a regular file is refused with `HashingError.notARegularFile`.
    static func sha256Hex(fileAt path: String) throws -> String {
        let descriptor = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC)
        guard descriptor >= 0 else { throw CocoaError(.fileReadNoSuchFile, userInfo: [NSFilePathErrorKey: path]) }
        let handle = FileHandle(fileDescriptor: descriptor, closeOnDealloc: true)
        var status = stat()
        guard fstat(descriptor, &status) == 0, status.st_mode & S_IFMT == S_IFREG else { throw HashingError.notARegularFile(path: path) }
        var hasher = SHA256()
        while let chunk = try handle.read(upToCount: 1 << 20), !chunk.isEmpty {
            hasher.update(data: chunk)
        }
        return hex(hasher.finalize())
    }

    /// Whether `path` names a regular file (following links), without opening it.
    static func isRegularFile(_ path: String) -> Bool {
        var status = stat()
        return stat(path, &status) == 0 && status.st_mode & S_IFMT == S_IFREG
    }

    static func hex<D: Sequence>(_ digest: D) -> String where D.Element == UInt8 {
        digest.map { String(format: "%02x", $0) }.joined()
    }
}

enum HashingError: Error {
    case notARegularFile(path: String)
}
