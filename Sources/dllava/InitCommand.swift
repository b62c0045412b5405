import ArgumentParser
import Foundation
import JobQueue

struct InitCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "init", abstract: "Create a queue database, or bring an existing one's schema up to date.")

    @OptionGroup var database: DatabaseOptions

    func run() throws {
        try runQueueCommand(self, database: database.path) {
            let existed = database.isPostgres || FileManager.default.fileExists(atPath: database.location)
            let queue = try database.open(create: true)
            let schema = try queue.appliedMigrations().last ?? "none"
            print(existed ? "\(database.path) is ready (schema \(schema))" : "created \(database.path) (schema \(schema))")
        }
    }
}
