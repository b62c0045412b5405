import ArgumentParser
import Foundation
import JobQueue

struct PruneCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "prune", abstract: "Delete finished jobs (succeeded, failed, cancelled) older than a duration.")

    @OptionGroup var database: DatabaseOptions

    @Option(name: .customLong("older-than"), help: "Age since the job finished, e.g. 7d, 12h, 30m.")
    var olderThan: String

    @Flag(name: .customLong("delete-outputs"), help: "Also delete the result and KV snapshot files of the pruned jobs (results and snapshots stored in a PostgreSQL queue's database always go with their jobs).")
    var deleteOutputs = false

    func validate() throws {
        guard DurationText.milliseconds(olderThan) != nil else {
            throw ValidationError("--older-than must be a duration such as 7d, 12h or 30m")
        }
    }

    func run() throws {
        try runQueueCommand(self, database: database.path) {
            let pruned = try database.open().prune(olderThan: DurationText.milliseconds(olderThan)!)
            let deleted = pruned.deleted
            var results = 0, snapshots = 0
            if deleteOutputs {
                for path in pruned.outputPaths where (try? FileManager.default.removeItem(atPath: path)) != nil { results += 1 }
                for path in pruned.snapshotPaths where (try? FileManager.default.removeItem(atPath: path)) != nil { snapshots += 1 }
            }
            print("deleted \(deleted) finished job\(deleted == 1 ? "" : "s") older than \(olderThan)"
                  + (deleteOutputs ? " and \(results) result file\(results == 1 ? "" : "s")" : "")
                  + (snapshots > 0 ? " and \(snapshots) snapshot\(snapshots == 1 ? "" : "s")" : ""))
        }
    }
}
