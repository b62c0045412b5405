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
        state filter and a search box, and needs no network. An image that is gone or a result file that cannot be \
        read is shown as such on its job. The file is written atomically; --output is refused (64) when it is the \
        queue database or not a regular file.
        """)

    @OptionGroup var database: DatabaseOptions

    @Option(help: "The HTML file to write.")
    var output: String

    @Option(help: "The page's title (default: the queue's location).")
    var title: String?

    func run() throws {
        try runQueueCommand(self, database: database.path) {
            try ExportCommand.checkOutput(output, database: database.path)
            let queue = try database.open(readOnly: true)
            let report = try RunReport.build(from: queue, title: title ?? "dllava run: \(database.path)")
            let written = try AtomicFile.write(Data(report.html().utf8), to: URL(fileURLWithPath: output))
            print("wrote \(output): \(report.jobs.count) job\(report.jobs.count == 1 ? "" : "s"), "
                  + String(format: "%.1f MB", Double(written.bytes) / 1_000_000))
        }
    }
}
