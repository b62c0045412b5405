import ArgumentParser
import Artifacts
import Foundation
import RunReport

struct ReportCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "report", abstract: "Write one self-contained HTML file that shows the queue's jobs, captions, errors and throughput.",
        discussion: """
        Per job: a thumbnail of the image (embedded; for a Dynamic-LLaVA job the image patches it dropped are darkened \
        and the kept ones outlined, from the kept indices its result file records), the caption or the error, state, \
        attempts, tokens, image tokens kept, prefill and decode times. Above them the totals and a bar chart of jobs \
        finished over time; below them the failed jobs with their errors. The page shows 100 jobs at a time, with a \
        state filter and a search box, and needs no network. Results are read where export reads them (the result \
        files, or a PostgreSQL queue's database). An image that is gone, or that changed since its job ran (its \
        sha256 differs from the one recorded), is shown as such instead of a thumbnail. A result that cannot be read \
        is shown on its job and reported on stderr; the page is still written and the exit status is 65. The file \
        is written atomically; --output is refused (64) when it is the queue database or one of its -wal, -shm or \
        -journal names, or exists and is not a regular file.
        """)

    @OptionGroup var database: DatabaseOptions

    @Option(help: "The HTML file to write.")
    var output: String

    @Option(help: "The page's title (default: the queue's location).")
    var title: String?

    func run() throws {
        try runQueueCommand(self, database: database.path) {
            try checkOutputFile(output, option: "--output", database: database)
            let queue = try database.open(readOnly: true)
            let report = try RunReport.build(from: queue, title: title ?? "dllava run: \(database.path)")
            let written = try AtomicFile.write(Data(report.html().utf8), to: URL(fileURLWithPath: output))
            print("wrote \(output): \(report.jobs.count) job\(report.jobs.count == 1 ? "" : "s"), "
                  + String(format: "%.1f MB", Double(written.bytes) / 1_000_000))
            for line in report.unreadableResults { writeStandardError(line) }
            let unreadable = report.unreadableResults.count
            if unreadable > 0 {
                throw CommandFailure(message: "\(unreadable) result\(unreadable == 1 ? "" : "s") could not be read (see above); the report shows "
                                     + "the error on \(unreadable == 1 ? "its job" : "their jobs"), without caption", code: 65)
            }
        }
    }
}
