import Foundation

/// Appends to a file made of checksummed frames (a KV snapshot): the bytes before the append point are never
/// written, so a crash mid-append leaves the good frames as they were and at worst a torn tail, which the reader
/// ignores and the next append cuts off.
public enum AppendFile {
    /// Cuts the existing file at `url` to `offset` bytes (dropping a tail an interrupted append left), writes
    /// `data` there and fsyncs the file. Throws, changing nothing, when the file is missing or shorter than
    /// `offset` (it is not the file the caller wrote), or is not a regular file.
    public static func append(_ data: Data, to url: URL, at offset: Int) throws {
        // Without blocking: a FIFO put in the snapshot's place is refused below, not waited on.
        let descriptor = open(url.path, O_WRONLY | O_NONBLOCK | O_CLOEXEC)
        guard descriptor >= 0 else { throw ArtifactError.posix("open", url.path) }
        defer { close(descriptor) }
        var status = stat()
        guard fstat(descriptor, &status) == 0 else { throw ArtifactError.posix("stat", url.path) }
        guard status.st_mode & S_IFMT == S_IFREG else {
            throw ArtifactError.refusedOutput(path: url.path, reason: "is \(OutputPath.describe(mode: status.st_mode)), not a regular file")
        }
        guard Int(status.st_size) >= offset else {
            throw ArtifactError.io(path: url.path, operation: "append to", reason: "it has \(status.st_size) bytes, fewer than the \(offset) written before")
        }
        if Int(status.st_size) > offset {
            guard ftruncate(descriptor, off_t(offset)) == 0 else { throw ArtifactError.posix("truncate", url.path) }
        }
        try data.withUnsafeBytes { (buffer: UnsafeRawBufferPointer) in
            var written = 0
            while written < buffer.count {
                let count = pwrite(descriptor, buffer.baseAddress! + written, buffer.count - written, off_t(offset + written))
                if count < 0 {
                    if errno == EINTR { continue }
                    throw ArtifactError.posix("write", url.path)
                }
                written += count
            }
        }
        while fsync(descriptor) != 0 {
            if errno != EINTR { throw ArtifactError.posix("fsync", url.path) }
        }
    }
}
