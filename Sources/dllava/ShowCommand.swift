import ArgumentParser
import Foundation
import JobQueue

struct ShowCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "show", abstract: "Show every field of jobs.")

    @OptionGroup var database: DatabaseOptions

    @Argument(help: "Job ids.")
    var ids: [Int64] = []

    @Option(name: .customLong("custom-id"), help: "A job's custom_id (repeatable).")
    var customIDs: [String] = []

    @Flag(help: "One JSON object per line.")
    var json = false

    func validate() throws {
        guard !ids.isEmpty || !customIDs.isEmpty else { throw ValidationError("give job ids or --custom-id") }
    }

    func run() throws {
        try runQueueCommand(self, database: database.path) {
            let queue = try database.open(readOnly: true)
            var jobs: [Job] = []
            for id in ids {
                guard let job = try queue.job(id: id) else { throw CommandFailure(message: "no job \(id) in \(database.path)", code: 65) }
                jobs.append(job)
            }
            for customID in customIDs {
                guard let job = try queue.job(customID: customID) else {
                    throw CommandFailure(message: "no job with custom_id '\(customID)' in \(database.path)", code: 65)
                }
                jobs.append(job)
            }
            for (index, job) in jobs.enumerated() {
                if json { try printJSON(job); continue }
                if index > 0 { print("") }
                let encoder = JSONEncoder()
                encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
                let fields: [(String, String?)] = [
                    ("id", "\(job.id)"), ("custom_id", job.customID), ("state", job.state.rawValue),
                    ("attempt", "\(job.attempt) of \(job.maxAttempts)"), ("priority", "\(job.priority)"),
                    ("image", job.imagePath), ("image_sha256", job.imageSHA256), ("prompt", job.prompt),
                    ("params", job.parameters.canonicalJSON()), ("run_at", timestamp(job.runAt)),
                    ("lease_owner", job.leaseOwner), ("lease_expires_at", job.leaseExpiresAt.map(timestamp)),
                    ("heartbeat_at", job.heartbeatAt.map(timestamp)), ("cancel_requested", job.cancelRequested ? "yes" : nil),
                    ("error", job.error), ("output", job.outputPath), ("output_sha256", job.outputSHA256),
                    ("timings", try job.timings.map { String(decoding: try encoder.encode($0), as: UTF8.self) }),
                    ("created_at", timestamp(job.createdAt)), ("updated_at", timestamp(job.updatedAt)),
                    ("started_at", job.startedAt.map(timestamp)), ("finalized_at", job.finalizedAt.map(timestamp)),
                ]
                for case let (name, value?) in fields {
                    print("\(name.padding(toLength: 16, withPad: " ", startingAt: 0)) \(value)")
                }
            }
        }
    }
}
