// The library side of the output-path check: every atomic write, append and result folder refuses what it must not
// replace, whichever caller asks.
import Foundation
import Testing
@testable import Artifacts

@Suite("OutputPath")
struct OutputPathTests {
    @Test func atomicWritesRefuseFIFOsFoldersDevicesAndLinksToThemAndLeaveThemAsTheyWere() throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let fifo = directory.appendingPathComponent("pipe").path, folder = directory.appendingPathComponent("folder").path
        #expect(mkfifo(fifo, 0o644) == 0)
        try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: false)
        let linkToNull = directory.appendingPathComponent("null").path, linkToFIFO = directory.appendingPathComponent("to-pipe").path
        #expect(symlink("/dev/null", linkToNull) == 0 && symlink(fifo, linkToFIFO) == 0)
        let cases = [(fifo, "is a FIFO, not a regular file"), (folder, "is a folder, not a regular file"),
                     (linkToNull, "is a symbolic link to a character device, not a regular file"),
                     (linkToFIFO, "is a symbolic link to a FIFO, not a regular file"), ("/dev/null", "is a character device, not a regular file")]
        for (path, reason) in cases {
            #expect(throws: ArtifactError.refusedOutput(path: path, reason: reason)) { try AtomicFile.write(Data("x".utf8), to: URL(fileURLWithPath: path)) }
        }
        var status = stat()
        #expect(lstat(fifo, &status) == 0 && status.st_mode & S_IFMT == S_IFIFO)
        #expect(lstat(linkToNull, &status) == 0 && status.st_mode & S_IFMT == S_IFLNK)
        #expect(stat("/dev/null", &status) == 0 && status.st_mode & S_IFMT == S_IFCHR)
        #expect(try FileManager.default.contentsOfDirectory(atPath: folder).isEmpty)
        // Only the names made above: no temporary file was left.
        #expect(try FileManager.default.contentsOfDirectory(atPath: directory.path).sorted() == ["folder", "null", "pipe", "to-pipe"])
        // A regular file, and a link that leads nowhere (replaced as a name), are written as before.
        let dangling = directory.appendingPathComponent("dangling").path
        #expect(symlink(directory.appendingPathComponent("nowhere").path, dangling) == 0)
        try AtomicFile.write(Data("new".utf8), to: URL(fileURLWithPath: dangling))
        #expect(lstat(dangling, &status) == 0 && status.st_mode & S_IFMT == S_IFREG)
        #expect(!FileManager.default.fileExists(atPath: directory.appendingPathComponent("nowhere").path))
    }

    @Test func anSQLiteDatabaseAndItsCompanionNamesAreNeverWrittenEvenWhenTheCompanionsAreAbsent() throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let database = directory.appendingPathComponent("jobs.db")
        let header = Data("SQLite format 3\0".utf8) + Data(repeating: 0, count: 84)
        try header.write(to: database)
        #expect(throws: ArtifactError.refusedOutput(path: database.path, reason: "is an SQLite database")) {
            try AtomicFile.write(Data("x".utf8), to: database)
        }
        for suffix in ["-wal", "-shm", "-journal"] {
            let companion = database.path + suffix
            #expect(throws: ArtifactError.refusedOutput(path: companion, reason: "is the name of the SQLite database \(database.path)'s \(suffix) file")) {
                try AtomicFile.write(Data("x".utf8), to: URL(fileURLWithPath: companion))
            }
            #expect(!FileManager.default.fileExists(atPath: companion))
        }
        #expect(try Data(contentsOf: database) == header)
        // A queue database named by the caller is protected before it has a header (an empty file), by name.
        let empty = directory.appendingPathComponent("empty.sqlite")
        try Data().write(to: empty)
        #expect(throws: ArtifactError.refusedOutput(path: empty.path + "-wal", reason: "is the name of the queue database's -wal file")) {
            try OutputPath.checkFile(empty.path + "-wal", protecting: [empty.path])
        }
        // A name that only looks like a companion, beside no database, is an ordinary file.
        try AtomicFile.write(Data("x".utf8), to: directory.appendingPathComponent("notes-journal"))
    }

    @Test func foldersRefuseAFileOnTheWayAndAppendsRefuseAFIFOWithoutWaitingOnIt() throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let file = directory.appendingPathComponent("file")
        try Data("keep".utf8).write(to: file)
        #expect(throws: ArtifactError.refusedOutput(path: file.path, reason: "is a regular file, not a folder")) {
            try ResultFile(directory: file.appendingPathComponent("queue"))
        }
        #expect(throws: ArtifactError.refusedOutput(path: file.path, reason: "is a regular file, not a folder")) {
            try ResultFile(directory: file)
        }
        #expect(try Data(contentsOf: file) == Data("keep".utf8))
        // A FIFO in a snapshot's place: opened without blocking, refused (with a reader) or not opened (without one).
        let fifo = directory.appendingPathComponent("job-1.kv.zst")
        #expect(mkfifo(fifo.path, 0o644) == 0)
        #expect(throws: ArtifactError.self) { try AppendFile.append(Data("frame".utf8), to: fifo, at: 0) }
        let reader = open(fifo.path, O_RDONLY | O_NONBLOCK)
        #expect(reader >= 0)
        defer { close(reader) }
        #expect(throws: ArtifactError.refusedOutput(path: fifo.path, reason: "is a FIFO, not a regular file")) {
            try AppendFile.append(Data("frame".utf8), to: fifo, at: 0)
        }
    }
}
