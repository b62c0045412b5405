import Foundation

/// The one check every path dllava writes goes through (`AtomicFile.write` calls `checkFile`; the commands call it
/// up front, so a refusal comes before any work). An atomic write renames a new file over its destination, which
/// replaces whatever is there: a device, a FIFO, a socket, a folder's name, a queue database. Each refusal is an
/// `ArtifactError.refusedOutput` naming the path; nothing has been written when it is thrown.
public enum OutputPath {
    /// The names SQLite gives a database's companion files (`queue.sqlite-wal`).
    public static let databaseCompanionSuffixes = ["-wal", "-shm", "-journal"]

    /// Refuses writing a file at `path` when
    /// - something that is not a regular file is there: a folder, FIFO, socket or device, or a symbolic link to one
    ///   (a dangling link is replaced as a name, never followed);
    /// - the file is an SQLite database (by its header), or one of `databases` or its -wal, -shm or -journal file (by
    ///   device and inode, so a hard link or another spelling of the path counts);
    /// - the name is the -wal, -shm or -journal name of an SQLite database or of one of `databases`, whether that file
    ///   exists or not (SQLite would take a file written there for its own);
    /// - the folder it goes into exists and is not a folder (a missing one is left to the write to report).
    /// `databases` are SQLite paths as the user gave them (a PostgreSQL URL is no file and is ignored).
    public static func checkFile(_ path: String, protecting databases: [String] = []) throws(ArtifactError) {
        var target = stat()
        if stat(path, &target) == 0 {
            let kind = describe(mode: target.st_mode)
            if target.st_mode & S_IFMT != S_IFREG {
                throw .refusedOutput(path: path, reason: "is \(isSymbolicLink(path) ? "a symbolic link to " : "")\(kind), not a regular file")
            }
            for database in databases {
                for suffix in [""] + databaseCompanionSuffixes {
                    var file = stat()
                    if stat(database + suffix, &file) == 0 && file.st_dev == target.st_dev && file.st_ino == target.st_ino {
                        throw .refusedOutput(path: path, reason: "is the queue database\(suffix.isEmpty ? "" : "'s \(suffix) file") \(database + suffix)")
                    }
                }
            }
            if isSQLiteDatabase(path) { throw .refusedOutput(path: path, reason: "is an SQLite database") }
        } else if !isSymbolicLink(path) {
            try checkFolder(of: path)
        }
        let url = URL(fileURLWithPath: path).standardizedFileURL
        for suffix in databaseCompanionSuffixes where url.lastPathComponent.hasSuffix(suffix) {
            let stem = String(url.path.dropLast(suffix.count))
            if isSQLiteDatabase(stem) {
                throw .refusedOutput(path: path, reason: "is the name of the SQLite database \(stem)'s \(suffix) file")
            }
            for database in databases where sameName(stem, database) {
                throw .refusedOutput(path: path, reason: "is the name of the queue database's \(suffix) file")
            }
        }
    }

    /// Refuses a folder to write into (`run --out`, `export --into`, `quantize --output`) when something that is not
    /// a folder is at `path` or at the nearest of its parents that exists (links to folders are followed).
    public static func checkDirectory(_ path: String) throws(ArtifactError) {
        var url = URL(fileURLWithPath: path).standardizedFileURL
        while true {
            var status = stat()
            if stat(url.path, &status) == 0 {
                guard status.st_mode & S_IFMT == S_IFDIR else {
                    let shown = url.path == URL(fileURLWithPath: path).standardizedFileURL.path ? path : url.path
                    throw .refusedOutput(path: shown, reason: "is \(describe(mode: status.st_mode)), not a folder")
                }
                return
            }
            if errno != ENOENT && errno != ENOTDIR { throw .posix("stat", url.path) }
            let parent = url.deletingLastPathComponent()
            if parent.path == url.path { return }
            url = parent
        }
    }

    /// `checkDirectory`, then creates the folder and its missing parents.
    public static func makeDirectory(_ url: URL) throws(ArtifactError) {
        try checkDirectory(url.path)
        do {
            try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        } catch {
            throw .io(path: url.path, operation: "create directory", reason: (error as NSError).localizedFailureReason ?? error.localizedDescription)
        }
    }

    /// The folder a new file at `path` would go into must exist and be a folder.
    static func checkFolder(of path: String) throws(ArtifactError) {
        let folder = URL(fileURLWithPath: path).deletingLastPathComponent().path
        var status = stat()
        guard stat(folder, &status) == 0 else { return }  // the write itself reports a missing folder with errno's words
        guard status.st_mode & S_IFMT == S_IFDIR else {
            throw .refusedOutput(path: path, reason: "goes into \(folder), which is \(describe(mode: status.st_mode)), not a folder")
        }
    }

    static func isSymbolicLink(_ path: String) -> Bool {
        var status = stat()
        return lstat(path, &status) == 0 && status.st_mode & S_IFMT == S_IFLNK
    }

    /// Whether the regular file at `path` starts with SQLite's header ("SQLite format 3" and a NUL). Opened without
    /// blocking and only when it is a regular file, so a FIFO put there meanwhile is never waited on.
    static func isSQLiteDatabase(_ path: String) -> Bool {
        let descriptor = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC)
        guard descriptor >= 0 else { return false }
        defer { close(descriptor) }
        var status = stat()
        guard fstat(descriptor, &status) == 0, status.st_mode & S_IFMT == S_IFREG else { return false }
        var header = [UInt8](repeating: 0, count: 16)
        guard read(descriptor, &header, 16) == 16 else { return false }
        return header == Array("SQLite format 3\0".utf8)
    }

    /// Two paths name the same file: equal once made absolute, or the same folder (by device and inode) and name.
    static func sameName(_ a: String, _ b: String) -> Bool {
        let first = URL(fileURLWithPath: a).standardizedFileURL, second = URL(fileURLWithPath: b).standardizedFileURL
        if first.path == second.path { return true }
        guard first.lastPathComponent == second.lastPathComponent else { return false }
        var folderA = stat(), folderB = stat()
        return stat(first.deletingLastPathComponent().path, &folderA) == 0 && stat(second.deletingLastPathComponent().path, &folderB) == 0
            && folderA.st_dev == folderB.st_dev && folderA.st_ino == folderB.st_ino
    }

    /// "a FIFO", "a folder", ... for a `st_mode`.
    static func describe(mode: mode_t) -> String {
        switch mode & S_IFMT {
        case S_IFDIR: "a folder"
        case S_IFIFO: "a FIFO"
        case S_IFSOCK: "a socket"
        case S_IFCHR: "a character device"
        case S_IFBLK: "a block device"
        case S_IFLNK: "a symbolic link"
        case S_IFREG: "a regular file"
        default: "a special file"
        }
    }
}
