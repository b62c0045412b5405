import Foundation

/// sha256 of file contents, remembered between runs so that a 13 GB checkpoint is read once, not at every start.
///
/// An entry is reused only while the file's device, inode, size, modification time and status-change time (both in
/// nanoseconds) are all what they were when it was hashed. Replacing a file (a new inode), rewriting it (new times)
/// or even restoring its modification time with `touch` (the status-change time still moves) makes it hashed again.
/// Only a deliberate change of the clock, or of the file system behind the kernel's back, could fool it, the same
/// bargain `make` and `rsync` strike.
///
/// The cache is one versioned JSON file (format version 1: `{"format_version": 1, "files": [{"path", "device",
/// "inode", "size", "mtime_ns", "ctime_ns", "sha256"}]}`), written atomically; one it cannot read, or of another
/// version, is treated as empty. Not thread-safe: one owner at a time.
public final class FileDigestCache {
    public static let formatVersion = 1

    /// Where the cache lives; nil keeps it in memory only.
    public let location: URL?
    /// Files this instance actually read (cache misses), for logs and tests.
    public private(set) var filesHashed = 0
    private var entries: [String: Entry] = [:]
    private var changed = false

    struct Entry: Codable, Equatable {
        var path: String
        var device: UInt64
        var inode: UInt64
        var size: Int64
        var mtimeNanoseconds: Int64
        var ctimeNanoseconds: Int64
        var sha256: String

        enum CodingKeys: String, CodingKey {
            case path, device, inode, size, mtimeNanoseconds = "mtime_ns", ctimeNanoseconds = "ctime_ns", sha256
        }

        func sameFile(as other: Entry) -> Bool {
            device == other.device && inode == other.inode && size == other.size
                && mtimeNanoseconds == other.mtimeNanoseconds && ctimeNanoseconds == other.ctimeNanoseconds
        }
    }

    struct Stored: Codable {
        var formatVersion: Int
        var files: [Entry]

        enum CodingKeys: String, CodingKey { case formatVersion = "format_version", files }
    }

    /// `$XDG_CACHE_HOME/dllava/file-digests.json`, else `$HOME/.cache/dllava/file-digests.json`, else nil.
    public static func defaultLocation(environment: [String: String] = ProcessInfo.processInfo.environment) -> URL? {
        if let base = environment["XDG_CACHE_HOME"], base.hasPrefix("/") {
            return URL(fileURLWithPath: base).appendingPathComponent("dllava/file-digests.json")
        }
        if let home = environment["HOME"], home.hasPrefix("/") {
            return URL(fileURLWithPath: home).appendingPathComponent(".cache/dllava/file-digests.json")
        }
        return nil
    }

    public init(location: URL?) {
        self.location = location
        guard let location, let data = try? Data(contentsOf: location),
              let stored = try? JSONDecoder().decode(Stored.self, from: data), stored.formatVersion == Self.formatVersion
        else { return }
        for entry in stored.files { entries[entry.path] = entry }
    }

    /// The file's sha256 (hex): from the cache while the file is unchanged, else read and remembered.
    public func sha256(ofFileAt url: URL) throws -> String {
        let path = url.standardizedFileURL.path
        let current = try Self.describe(path)
        if let entry = entries[path], entry.sameFile(as: current) { return entry.sha256 }
        var entry = current
        entry.sha256 = try Checksum.sha256Hex(fileAt: URL(fileURLWithPath: path))
        // A file changed while it was read gets no entry: the next start reads it again.
        if try Self.describe(path).sameFile(as: entry) {
            entries[path] = entry
            changed = true
        }
        filesHashed += 1
        return entry.sha256
    }

    /// Writes the cache when something new was learnt. A cache that cannot be written costs a re-read next time,
    /// nothing else, so the caller may log the error and go on.
    public func save() throws {
        guard changed, let location else { return }
        let directory = location.deletingLastPathComponent()
        try OutputPath.makeDirectory(directory)
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        // Encoding strings and integers cannot fail.
        let data = try! encoder.encode(Stored(formatVersion: Self.formatVersion, files: entries.values.sorted { $0.path < $1.path }))
        try AtomicFile.write(data, to: location)
        changed = false
    }

    static func describe(_ path: String) throws -> Entry {
        var status = stat()
        guard stat(path, &status) == 0 else { throw ArtifactError.posix("stat", path) }
        guard status.st_mode & S_IFMT == S_IFREG else { throw ArtifactError.io(path: path, operation: "hash", reason: "not a regular file") }
        return Entry(path: path, device: UInt64(status.st_dev), inode: UInt64(status.st_ino), size: Int64(status.st_size),
                     mtimeNanoseconds: Int64(status.st_mtim.tv_sec) * 1_000_000_000 + Int64(status.st_mtim.tv_nsec),
                     ctimeNanoseconds: Int64(status.st_ctim.tv_sec) * 1_000_000_000 + Int64(status.st_ctim.tv_nsec), sha256: "")
    }
}

extension ModelFingerprint {
    /// A fingerprint of a model's contents: sha256 over one line `<label> <sha256 of the file>\n` per file, in the
    /// order given (labels name a file's role and name, e.g. `model/config.json`, `vision/model.safetensors`, so
    /// moving the model elsewhere keeps its fingerprint). Every byte of every file counts: a retrained checkpoint of
    /// the same size is told apart. `cache` spares re-reading unchanged files.
    public static func content(of files: [(label: String, url: URL)], name: String?, cache: FileDigestCache) throws -> ModelFingerprint {
        var description = ""
        for (label, url) in files {
            description += "\(label) \(try cache.sha256(ofFileAt: url))\n"
        }
        return ModelFingerprint(fingerprint: Checksum.sha256Hex(Data(description.utf8)), name: name)
    }
}
