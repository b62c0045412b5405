import ArgumentParser
import Foundation
import JobQueue

struct CancelCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cancel", abstract: "Cancel queued jobs, and ask running ones to stop.",
        discussion: """
        Selects by ids, --custom-id and --state (all given conditions must hold), or --all. Queued jobs (available, \
        retryable) are cancelled at once; a running job leaves its batch at the daemon's next decode step.
        """)

    @OptionGroup var database: DatabaseOptions
    @OptionGroup var selection: SelectionOptions

    @Flag(help: "Cancel every unfinished job.")
    var all = false

    func validate() throws {
        // Exactly one of: a selection, or --all.
        guard selection.filter.isEmpty == all else {
            throw ValidationError(all ? "--all cannot be combined with other selections" : "select jobs: give ids, --custom-id, --state or --all")
        }
    }

    func run() throws {
        try runQueueCommand(self, database: database.path) {
            let result = try database.open().cancel(all ? .all : selection.filter)
            print("cancelled \(result.cancelled) queued job\(result.cancelled == 1 ? "" : "s"); "
                  + "asked \(result.requested) running job\(result.requested == 1 ? "" : "s") to stop")
        }
    }
}
