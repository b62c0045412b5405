import ArgumentParser
import Foundation
import JobQueue

struct RetryCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "retry", abstract: "Put failed or cancelled jobs back in the queue.",
        discussion: """
        Selects by ids, --custom-id and --state (all given conditions must hold); jobs in other states than failed and \
        cancelled are left alone. Each requeued job gets --attempts fresh tries: its attempt counter keeps counting \
        (it fences late results) and max_attempts becomes attempt + N.
        """)

    @OptionGroup var database: DatabaseOptions
    @OptionGroup var selection: SelectionOptions

    @Option(help: "Fresh tries each requeued job gets.")
    var attempts = 3

    func validate() throws {
        guard !selection.filter.isEmpty else { throw ValidationError("select jobs: give ids, --custom-id or --state") }
        guard attempts >= 1 else { throw ValidationError("--attempts must be at least 1") }
    }

    func run() throws {
        try runQueueCommand(self, database: database.path) {
            let count = try database.open().retry(selection.filter, attempts: attempts)
            print("requeued \(count) job\(count == 1 ? "" : "s")")
        }
    }
}
