import ArgumentParser
import BatchDaemon
import Foundation
import JobQueue

struct CopyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "copy", abstract: "Copy a queue, every job as it is, into a new queue (SQLite to PostgreSQL and back).",
        discussion: """
        Moves a queue between backends without running anything again: every job keeps its id, state, attempts, \
        error, result path and checksum, and the copy keeps the queue's id, so result and snapshot files already \
        written under OUT/<queue id>/ belong to the copy. New jobs get ids above any the original handed out. The \
        target is created when missing and must hold no jobs. Stop the workers first: a job running during the copy \
        is copied as running and is rescued when its lease expires.

        Results and snapshots move too. Into a PostgreSQL queue, each succeeded job's result (read from the file its \
        row records, or from the source's database, and checked against its sha256) and each job's latest snapshot \
        are stored in the database, so workers on other machines can export and resume them. From a PostgreSQL queue \
        into an SQLite one they are written as files under OUT/<queue id>/ (--out), whose paths the copied rows \
        record. A result that cannot be read is reported, its job copied without it, and the exit status is 65.
        """)

    @Option(help: ArgumentHelp("The queue to copy: an SQLite file or a postgres:// URL.", valueName: "path-or-url"))
    var from: String

    @Option(help: ArgumentHelp("The new queue: an SQLite file or a postgres:// URL.", valueName: "path-or-url"))
    var to: String

    @Option(help: ArgumentHelp("Folder for the result and snapshot files of a copy from PostgreSQL into SQLite.", valueName: "dir"))
    var out: String?

    @Option(name: .customLong("busy-timeout"), help: "Seconds to wait for a busy database or an unreachable server (exit 75).")
    var busyTimeout: Double = 10

    func validate() throws {
        guard busyTimeout >= 0 else { throw ValidationError("--busy-timeout must not be negative") }
        guard DatabaseOptions.displayed(from) != DatabaseOptions.displayed(to) else { throw ValidationError("--from and --to name the same queue") }
    }

    func run() throws {
        try runQueueCommand(self, database: DatabaseOptions.displayed(from)) {
            let source = try DatabaseOptions.open(from, access: .readOnly, busyTimeout: busyTimeout)
            let target = try DatabaseOptions.open(to, access: .create, busyTimeout: busyTimeout)
            let folder = out.map { URL(fileURLWithPath: $0) }
            let report = try QueueCopy.copy(from: source, to: target, files: folder.map { folder in
                { identity in try DirectoryArtifactStore(queue: target, out: folder, identity: identity) }
            })
            print("copied \(report.jobs) job\(report.jobs == 1 ? "" : "s") of queue \(report.identity) from \(source.location) to \(target.location), "
                  + "with \(report.results) result\(report.results == 1 ? "" : "s") and \(report.snapshots) snapshot\(report.snapshots == 1 ? "" : "s")")
            for problem in report.unreadableResults { writeStandardError(problem) }
            if !report.unreadableResults.isEmpty {
                let count = report.unreadableResults.count
                throw CommandFailure(message: "\(count) result\(count == 1 ? "" : "s") could not be read (see above); their jobs were copied without them",
                                     code: 65)
            }
        }
    }
}
