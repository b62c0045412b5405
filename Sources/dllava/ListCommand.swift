import ArgumentParser
import Foundation
import JobQueue

struct ListCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "list", abstract: "List jobs by id.")

    @OptionGroup var database: DatabaseOptions

    @Option(help: "Only jobs in this state (repeatable).")
    var state: [JobState] = []

    @Option(name: .customLong("custom-id"), help: "Only the job with this custom_id (repeatable).")
    var customIDs: [String] = []

    @Option(help: "At most this many jobs.")
    var limit = 100

    @Option(help: "Start after this job id (for paging).")
    var after: Int64 = 0

    @Flag(help: "One JSON object per line.")
    var json = false

    func validate() throws {
        guard limit >= 1 else { throw ValidationError("--limit must be at least 1") }
    }

    func run() throws {
        try runQueueCommand(self, database: database.path) {
            let filter = JobFilter(customIDs: customIDs.isEmpty ? nil : customIDs, states: state.isEmpty ? nil : Set(state))
            let queue = try database.open(readOnly: true)
            let jobs = try queue.list(filter, limit: limit, afterID: after)
            let orphans = Dictionary(try queue.orphanedJobs().map { ($0.id, $0) }) { first, _ in first }
            if json {
                for job in jobs { try printJSON(job) }
                return
            }
            print(["ID", "STATE", "ATTEMPT", "PRIORITY", "CUSTOM_ID", "IMAGE", "ERROR"].joined(separator: "\t"))
            for job in jobs {
                print(["\(job.id)", job.state.rawValue + (job.cancelRequested ? "*" : ""), "\(job.attempt)/\(job.maxAttempts)",
                       "\(job.priority)", job.customID ?? "-", job.imagePath,
                       orphans[job.id].map(orphanNote) ?? job.error.map { String($0.prefix(80)) } ?? ""]
                    .joined(separator: "\t"))
            }
        }
    }
}
