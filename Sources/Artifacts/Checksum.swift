import Crypto
import Foundation

/// SHA-256 checksums as lowercase hex, the form job rows record.
public enum Checksum {
    public static func sha256Hex(_ data: Data) -> String {
        hex(SHA256.hash(data: data))
    }

    /// Reads the file in 1 MiB pieces. Only a regular file is read: the file is opened without blocking (a FIFO
    /// named like an image would otherwise wait forever for a writer) and anything else is refused.
    public static func sha256Hex(fileAt url: URL) throws -> String {
        let descriptor = open(url.path, O_RDONLY | O_NONBLOCK | O_CLOEXEC)
        guard descriptor >= 0 else { throw ArtifactError.posix("open", url.path) }
        defer { close(descriptor) }
        var status = stat()
        guard fstat(descriptor, &status) == 0 else { throw ArtifactError.posix("stat", url.path) }
        guard status.st_mode & S_IFMT == S_IFREG else {
            throw ArtifactError.io(path: url.path, operation: "read", reason: "not a regular file")
        }
        var hasher = SHA256()
        var buffer = [UInt8](repeating: 0, count: 1 << 20)
        while true {
            let count = buffer.withUnsafeMutableBytes { read(descriptor, $0.baseAddress, $0.count) }
            if count < 0 {
                if errno == EINTR { continue }
                throw ArtifactError.posix("read", url.path)
            }
            if count == 0 { break }
            buffer.withUnsafeBytes { hasher.update(bufferPointer: UnsafeRawBufferPointer(rebasing: $0[..<count])) }
        }
        return hex(hasher.finalize())
    }

    static func hex<D: Sequence>(_ digest: D) -> String where D.Element == UInt8 {
        digest.map { String(format: "%02x", $0) }.joined()
    }
}
