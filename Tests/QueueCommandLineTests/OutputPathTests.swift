// Every path dllava writes goes through one check: what is there and is not a regular file (or, for a folder, not a
// folder) is refused with exit 64 naming it, and left as it was; so are the queue database's companion names.
import CommandLineSupport
import Foundation
import Testing

/// Binds a Unix socket at `path` (the file stays after the descriptor is closed).
func makeSocket(at path: String) throws {
    let descriptor = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
    try #require(descriptor >= 0)
    defer { close(descriptor) }
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    let bytes = Array(path.utf8)
    try #require(bytes.count < MemoryLayout.size(ofValue: address.sun_path))
    withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: bytes) }
    let bound = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(descriptor, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
    }
    try #require(bound == 0)
}

/// The file type at `path` without following a link (`S_IFIFO`, ...), or nil when nothing is there.
func fileType(_ path: String) -> mode_t? {
    var status = stat()
    return lstat(path, &status) == 0 ? status.st_mode & S_IFMT : nil
}

@Suite("output paths")
struct OutputPathTests {
    /// A queue with three jobs, and beside it a FIFO, a socket, a folder and links to each and to /dev/null.
    func hostileWorkspace() throws -> (Workspace, targets: [(path: String, kind: String)]) {
        let workspace = try Workspace()
        #expect(try workspace.queue("init").status == 0)
        _ = try workspace.queue("enqueue", "--jsonl", workspace.standardManifest().path)
        let directory = workspace.directory.path
        #expect(mkfifo(directory + "/pipe", 0o644) == 0)
        try makeSocket(at: directory + "/socket")
        try FileManager.default.createDirectory(atPath: directory + "/folder", withIntermediateDirectories: false)
        for (link, target) in [("to-pipe", "pipe"), ("to-socket", "socket"), ("to-folder", "folder"), ("to-null", "/dev/null")] {
            #expect(symlink(target, directory + "/" + link) == 0)
        }
        return (workspace, [("/dev/null", "a character device"), ("pipe", "a FIFO"), ("socket", "a socket"), ("folder", "a folder"),
                            ("to-pipe", "a symbolic link to a FIFO"), ("to-socket", "a symbolic link to a socket"),
                            ("to-folder", "a symbolic link to a folder"), ("to-null", "a symbolic link to a character device")])
    }

    /// Each command that writes a file, with its option, as run in `workspace` with `path` as that file.
    func fileWriters(_ workspace: Workspace) -> [(option: String, arguments: (String) -> [String])] {
        [("--output", { ["export", "--db", workspace.database, "--output", $0] }),
         ("--output", { ["report", "--db", workspace.database, "--output", $0] }),
         ("--metrics-file", { ["run", "--db", workspace.database, "--out", "out", "--model", "no-model", "--until-empty", "--metrics-file", $0] }),
         ("--kept-patches", { ["generate", "--model", "no-model", "--image", "images/a.jpg", "--prompt", "Hi", "--kept-patches", $0] })]
    }

    @Test func everyFileOutputRefusesDevicesFIFOsSocketsFoldersAndLinksToThemAndLeavesThemAlone() throws {
        let (workspace, targets) = try hostileWorkspace()
        defer { workspace.remove() }
        let before = targets.map { fileType($0.path.hasPrefix("/") ? $0.path : workspace.directory.path + "/" + $0.path) }
        for (option, arguments) in fileWriters(workspace) {
            for (path, kind) in targets {
                let run = try workspace.run(arguments(path))
                #expect(run.status == 64, "\(arguments(path)): \(run.standardError)")
                #expect(run.errorLines == ["dllava: \(option) \(path) is \(kind), not a regular file; nothing was written there"], "\(run.standardError)")
            }
        }
        let after = targets.map { fileType($0.path.hasPrefix("/") ? $0.path : workspace.directory.path + "/" + $0.path) }
        #expect(after == before && after[0] == S_IFCHR)
        #expect(try FileManager.default.contentsOfDirectory(atPath: workspace.directory.path + "/folder").isEmpty)
        // Nothing was started: no result folder, no temporary file beside the targets.
        let left = try FileManager.default.contentsOfDirectory(atPath: workspace.directory.path).sorted()
        #expect(left.filter { !$0.hasPrefix("queue.sqlite") } == ["folder", "images", "jobs.jsonl", "pipe", "socket", "to-folder", "to-null", "to-pipe", "to-socket"])
    }

    @Test func theQueueDatabaseItsCompanionNamesAndOtherDatabasesAreRefusedEvenWhenTheCompanionsAreAbsent() throws {
        let workspace = try Workspace()
        defer { workspace.remove() }
        #expect(try workspace.queue("init").status == 0)
        #expect(try workspace.run(["init", "--db", "other.sqlite"]).status == 0)
        let database = workspace.database
        for suffix in ["-wal", "-shm", "-journal"] { unlink(database + suffix); unlink(workspace.directory.path + "/other.sqlite" + suffix) }
        for (option, arguments) in fileWriters(workspace).prefix(3) {
            for suffix in ["-wal", "-shm", "-journal"] {
                for path in [database + suffix, "queue.sqlite" + suffix, "other.sqlite" + suffix] {
                    let run = try workspace.run(arguments(path))
                    #expect(run.status == 64, "\(arguments(path)): \(run.standardError)")
                    #expect(run.errorLines.count == 1 && run.standardError.hasPrefix("dllava: \(option) \(path) is the name of the "), "\(run.standardError)")
                    #expect(run.standardError.contains("\(suffix) file; nothing was written there"), "\(run.standardError)")
                }
            }
            let other = try workspace.run(arguments("other.sqlite"))
            #expect(other.status == 64 && other.errorLines == ["dllava: \(option) other.sqlite is an SQLite database; nothing was written there"],
                    "\(other.standardError)")
        }
        for suffix in ["-wal", "-shm", "-journal"] {
            #expect(fileType(database + suffix) == nil && fileType(workspace.directory.path + "/other.sqlite" + suffix) == nil)
        }
    }

    @Test func everyFolderOutputRefusesWhatIsNotAFolder() throws {
        let (workspace, _) = try hostileWorkspace()
        defer { workspace.remove() }
        try workspace.file("file.txt", "a file")
        let writers: [(option: String, arguments: (String) -> [String])] = [
            ("--out", { ["run", "--db", workspace.database, "--model", "no-model", "--until-empty", "--out", $0] }),
            ("--output", { ["quantize", "--model", "no-model", "--output", $0] }),
            ("--into", { ["export", "--db", workspace.database, "--format", "sidecar", "--into", $0] }),
        ]
        for (option, arguments) in writers {
            for (path, kind) in [("file.txt", "a regular file"), ("pipe", "a FIFO"), ("socket", "a socket"), ("/dev/null", "a character device")] {
                let run = try workspace.run(arguments(path))
                #expect(run.status == 64, "\(arguments(path)): \(run.standardError)")
                #expect(run.standardError.contains("\(path) is \(kind), not a folder; nothing was written there"), "\(run.standardError)")
                #expect(run.errorLines.count == 1 && run.standardError.hasPrefix("dllava: \(option) "), "\(run.standardError)")
            }
            // A folder below a file cannot be made either.
            let below = try workspace.run(arguments("file.txt/sub"))
            #expect(below.status == 64 && below.standardError.contains("file.txt is a regular file, not a folder"), "\(below.standardError)")
        }
        #expect(try String(contentsOfFile: workspace.directory.path + "/file.txt", encoding: .utf8) == "a file")
        #expect(fileType("/dev/null") == S_IFCHR && fileType(workspace.directory.path + "/pipe") == S_IFIFO)
    }
}
