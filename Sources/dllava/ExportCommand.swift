import ArgumentParser
import Artifacts
import BatchDaemon
import Foundation
import JobQueue

struct ExportCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "export", abstract: "Write one record per job: custom_id, state, attempts, and text or error.",
        discussion: """
        Records carry job_id, custom_id, image, state, attempts, finish_reason, text (read from the job's result \
        file, or from a PostgreSQL queue's database, checked against its recorded sha256) and error. JSONL leaves out absent fields; CSV has a header row and \
        empty cells for them. The output file is written atomically. A result file that cannot be read is reported on \
        stderr, its record carries the error, and the exit status is 65. An --output that is the queue database or its \
        -wal or -shm file (by device and inode, so links count), or an existing file that is not a regular file (a \
        directory, FIFO or device), is refused with exit status 64 before anything is written.
        """)

    enum Format: String, ExpressibleByArgument, CaseIterable { case jsonl, csv }

    @OptionGroup var database: DatabaseOptions

    @Option(help: "jsonl or csv (default: from the --output extension, else jsonl).")
    var format: Format?

    @Option(help: "Only jobs in this state (repeatable), e.g. succeeded or failed.")
    var state: [JobState] = []

    @Option(help: "The file to write, or - for standard output.")
    var output: String

    var resolvedFormat: Format { format ?? (output.lowercased().hasSuffix(".csv") ? .csv : .jsonl) }

    /// Refuses an output that would destroy the queue (the database or its -wal or -shm, by device and inode: a
    /// link or another spelling of the path is the same file) or that is not a regular file; renaming the export
    /// over any of these would replace it.
    static func checkOutput(_ output: String, database: String) throws {
        var target = stat()
        guard stat(output, &target) == 0 else { return }  // nothing there yet (or a dangling link, replaced as a name)
        for suffix in ["", "-wal", "-shm", "-journal"] {
            var file = stat()
            if stat(database + suffix, &file) == 0 && file.st_dev == target.st_dev && file.st_ino == target.st_ino {
                throw CommandFailure(message: "--output \(output) is the queue database\(suffix.isEmpty ? "" : "'s \(suffix) file") \(database + suffix); "
                                     + "export to another file", code: 64)
            }
        }
        guard target.st_mode & S_IFMT == S_IFREG else {
            throw CommandFailure(message: "--output \(output) exists and is not a regular file; export to a regular file or to -", code: 64)
        }
    }

    func run() throws {
        try runQueueCommand(self, database: database.path) {
            if output != "-" { try Self.checkOutput(output, database: database.path) }
            let queue = try database.open(readOnly: true)
            let filter = JobFilter(states: state.isEmpty ? nil : Set(state))
            var unreadable = 0
            func records(_ emit: (String) throws -> Void) throws {
                if resolvedFormat == .csv { try emit(ExportRecord.csvHeader) }
                try ExportRecord.forEach(in: queue, filter) { record in
                    if record.resultUnreadable {
                        unreadable += 1
                        writeStandardError(record.error ?? "")
                    }
                    try emit(resolvedFormat == .jsonl ? record.jsonLine() : record.csvRow())
                }
            }
            if output == "-" {
                try records { FileHandle.standardOutput.write(Data($0.utf8)) }
            } else {
                try AtomicFile.write(to: URL(fileURLWithPath: output)) { writer in
                    try records { try writer.write($0) }
                }
            }
            if unreadable > 0 {
                throw CommandFailure(message: "\(unreadable) result file\(unreadable == 1 ? "" : "s") could not be read (see above); their records carry the error", code: 65)
            }
        }
    }
}
