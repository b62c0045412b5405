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
        -wal, -shm or -journal file (by device and inode, so links count, or by name when that file does not exist), \
        another SQLite database, or an existing file that is not a regular file (a directory, FIFO, socket or device, \
        or a link to one), is refused with exit status 64 before anything is written.

        --format sidecar writes no --output: one caption file per succeeded job, named like its image with \
        --extension (cat.png -> cat.txt), the layout kohya-ss, taggui and OneTrainer read. The files go beside the \
        images, or with --into DIR into a tree under DIR that mirrors the images' folders below the deepest folder \
        holding them all. A file that exists is skipped and reported unless --overwrite; when two jobs caption the \
        same image, the first by job id writes the file and the other is reported. An --into that is not a folder, a \
        symbolic link among the folders below it, or (with --overwrite) a caption's place holding a device, FIFO, \
        socket or folder, is refused with exit status 64 before any file is written.
        """)

    enum Format: String, ExpressibleByArgument, CaseIterable { case jsonl, csv, sidecar }

    @OptionGroup var database: DatabaseOptions

    @Option(help: "jsonl, csv or sidecar (default: from the --output extension, else jsonl).")
    var format: Format?

    @Option(help: "Only jobs in this state (repeatable), e.g. succeeded or failed.")
    var state: [JobState] = []

    @Option(help: "The file to write, or - for standard output (jsonl and csv).")
    var output: String?

    @Option(name: .customLong("extension"), help: "sidecar: the caption file's extension, replacing the image's.")
    var sidecarExtension = ".txt"

    @Option(help: ArgumentHelp("sidecar: write into a tree under this folder instead of beside the images.", valueName: "dir"))
    var into: String?

    @Flag(help: "sidecar: replace caption files that exist.")
    var overwrite = false

    var resolvedFormat: Format { format ?? ((output ?? "").lowercased().hasSuffix(".csv") ? .csv : .jsonl) }

    func validate() throws {
        if resolvedFormat == .sidecar {
            guard output == nil else { throw ValidationError("--format sidecar writes caption files, not --output; use --into DIR to choose where") }
            guard state.isEmpty || state == [.succeeded] else { throw ValidationError("--format sidecar writes the captions of succeeded jobs only; drop --state") }
            if let problem = SidecarOptions.problem(withExtension: sidecarExtension) { throw ValidationError(problem) }
        } else {
            guard output != nil else { throw ValidationError("--output FILE (or -) is needed for --format \(resolvedFormat.rawValue)") }
            guard into == nil && !overwrite && sidecarExtension == ".txt" else {
                throw ValidationError("--into, --overwrite and --extension apply to --format sidecar only")
            }
        }
    }

    func run() throws {
        if resolvedFormat == .sidecar { return try writeSidecars() }
        let output = output ?? "-"
        try runQueueCommand(self, database: database.path) {
            if output != "-" { try checkOutputFile(output, option: "--output", database: database) }
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

    /// `--format sidecar`: the caption files, then one line per skipped job on stderr and a summary on stdout.
    func writeSidecars() throws {
        try runQueueCommand(self, database: database.path) {
            if let into { try checkOutputDirectory(into, option: "--into") }
            let queue = try database.open(readOnly: true)
            let options = SidecarOptions(fileExtension: sidecarExtension, into: into.map { URL(fileURLWithPath: $0) }, overwrite: overwrite)
            let report = try CaptionSidecars.export(from: queue, .all, options: options)
            for record in report.unreadable { writeStandardError(record.error ?? "") }
            for skipped in report.skipped { writeStandardError("skipped job \(skipped.jobID): \(skipped.path): \(skipped.reason)") }
            print("wrote \(report.written.count) caption file\(report.written.count == 1 ? "" : "s"); skipped \(report.skipped.count)"
                  + (report.unreadable.isEmpty ? "" : "; \(report.unreadable.count) result file\(report.unreadable.count == 1 ? "" : "s") unreadable"))
            if !report.unreadable.isEmpty {
                throw CommandFailure(message: "\(report.unreadable.count) result file\(report.unreadable.count == 1 ? "" : "s") could not be read (see above); no caption file was written for \(report.unreadable.count == 1 ? "it" : "them")", code: 65)
            }
        }
    }
}
