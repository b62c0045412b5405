import Crypto
import Foundation

/// Writes files so a reader sees the old file or the whole new one, never a part: the bytes go to a temporary
/// name in the same directory, are fsynced, renamed over the destination, and the directory is fsynced so the
/// rename itself survives a crash. On any failure the temporary file is removed and the destination is
/// untouched.
public enum AtomicFile {
    /// What was written: where, how many bytes, and their sha256.
    public struct Written: Sendable, Hashable {
        public var url: URL
        public var bytes: Int
        public var sha256: String
    }

    /// Streams the file's bytes through `body`; an error thrown by `body` abandons the write. A destination that
    /// `OutputPath.checkFile` refuses (a device, FIFO, socket, folder, SQLite database or one of its companion names)
    /// is never replaced: `ArtifactError.refusedOutput` is thrown before anything is written.
    @discardableResult
    public static func write(to url: URL, permissions: mode_t = 0o644, _ body: (inout Writer) throws -> Void) throws -> Written {
        try OutputPath.checkFile(url.path)
        let directory = url.deletingLastPathComponent().path
        let temporary = url.deletingLastPathComponent()
            .appendingPathComponent(".\(url.lastPathComponent).tmp-\(getpid())-\(UInt32.random(in: .min ... .max))").path
        let descriptor = open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, permissions)
        guard descriptor >= 0 else { throw ArtifactError.posix("create", temporary) }
        var writer = Writer(descriptor: descriptor, path: temporary)
        do {
            try body(&writer)
            while fsync(descriptor) != 0 {
                if errno != EINTR { throw ArtifactError.posix("fsync", temporary) }
            }
            guard close(descriptor) == 0 else {
                writer.descriptor = -1
                throw ArtifactError.posix("close", temporary)
            }
            writer.descriptor = -1
            guard rename(temporary, url.path) == 0 else { throw ArtifactError.posix("rename to \(url.path)", temporary) }
        } catch {
            if writer.descriptor >= 0 { close(writer.descriptor) }
            unlink(temporary)
            throw error
        }
        try syncDirectory(directory)
        return Written(url: url, bytes: writer.bytes, sha256: Checksum.hex(writer.hasher.finalize()))
    }

    @discardableResult
    public static func write(_ data: Data, to url: URL, permissions: mode_t = 0o644) throws -> Written {
        try write(to: url, permissions: permissions) { try $0.write(data) }
    }

    /// fsync on the directory makes a rename or a new name in it durable.
    public static func syncDirectory(_ path: String) throws {
        let descriptor = open(path.isEmpty ? "." : path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard descriptor >= 0 else { throw ArtifactError.posix("open directory", path) }
        defer { close(descriptor) }
        while fsync(descriptor) != 0 {
            if errno != EINTR { throw ArtifactError.posix("fsync directory", path) }
        }
    }

    /// Appends to the temporary file, hashing as it goes.
    public struct Writer {
        var descriptor: Int32
        let path: String
        public private(set) var bytes = 0
        var hasher = SHA256()

        init(descriptor: Int32, path: String) {
            self.descriptor = descriptor
            self.path = path
        }

        public mutating func write(_ data: Data) throws {
            try data.withUnsafeBytes { try write($0) }
        }

        public mutating func write(_ text: String) throws {
            var text = text
            try text.withUTF8 { try write(UnsafeRawBufferPointer($0)) }
        }

        public mutating func write(_ buffer: UnsafeRawBufferPointer) throws {
            hasher.update(bufferPointer: buffer)
            var offset = 0
            while offset < buffer.count {
                let count = Foundation.write(descriptor, buffer.baseAddress! + offset, buffer.count - offset)
                if count < 0 {
                    if errno == EINTR { continue }
                    throw ArtifactError.posix("write", path)
                }
                offset += count
            }
            bytes += buffer.count
        }
    }
}
