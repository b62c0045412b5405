import ArgumentParser
import Foundation
import JobQueue

struct StatusCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status", abstract: "Jobs per state, throughput and the time left.",
        discussion: "Throughput counts jobs that succeeded within --window, over the part of it in which they ran.")

    @OptionGroup var database: DatabaseOptions

    @Option(help: "How far back throughput looks (e.g. 1h, 30m, 1d).")
    var window = "1h"

    @Flag(help: "Print one JSON object.")
    var json = false

    func validate() throws {
        guard let window = DurationText.milliseconds(window), window > 0 else {
            throw ValidationError("--window must be a duration such as 1h, 30m or 1d")
        }
    }

    struct Report: Encodable {
        let database: String
        let queue_id: String
        let counts: [String: Int]
        let total: Int
        let remaining: Int
        let window_ms: Int64
        let succeeded_in_window: Int
        let jobs_per_hour: Double?
        let eta_ms: Int64?
        let orphaned: [Orphan]

        /// Unknown figures are written as null rather than left out, so readers find every key.
        func encode(to encoder: Encoder) throws {
            enum Key: String, CodingKey {
                case database, queue_id, counts, total, remaining, window_ms, succeeded_in_window, jobs_per_hour, eta_ms, orphaned
            }
            var container = encoder.container(keyedBy: Key.self)
            try container.encode(database, forKey: .database)
            try container.encode(queue_id, forKey: .queue_id)
            try container.encode(counts, forKey: .counts)
            try container.encode(total, forKey: .total)
            try container.encode(remaining, forKey: .remaining)
            try container.encode(window_ms, forKey: .window_ms)
            try container.encode(succeeded_in_window, forKey: .succeeded_in_window)
            try container.encode(jobs_per_hour, forKey: .jobs_per_hour)
            try container.encode(eta_ms, forKey: .eta_ms)
            try container.encode(orphaned, forKey: .orphaned)
        }
    }

    /// A running job whose worker is gone, as `status --json` reports it.
    struct Orphan: Encodable {
        let id: Int64
        let owner: String
        let host: String
        /// Why the worker is taken for gone.
        let reason: String
        /// When its lease expires: the latest it becomes claimable (a run on a dead worker's host reclaims it at once).
        let lease_expires_at: Int64
    }

    func run() throws {
        try runQueueCommand(self, database: database.path) {
            let queue = try database.open(readOnly: true)
            let orphans = try queue.orphanedJobs()
            let statistics = try queue.statistics(window: DurationText.milliseconds(window)!)
            let total = statistics.counts.values.reduce(0, +)
            if json {
                try printJSON(Report(database: database.path, queue_id: queue.identity,
                                     counts: Dictionary(uniqueKeysWithValues: statistics.counts.map { ($0.key.rawValue, $0.value) }),
                                     total: total, remaining: statistics.remaining, window_ms: statistics.windowMs,
                                     succeeded_in_window: statistics.succeededInWindow, jobs_per_hour: statistics.jobsPerHour,
                                     eta_ms: statistics.etaMs,
                                     orphaned: orphans.map { Orphan(id: $0.id, owner: $0.owner, host: $0.host, reason: orphanReason($0),
                                                                    lease_expires_at: $0.leaseExpiresAt) }))
                return
            }
            print("\(database.path) (queue \(queue.identity))")
            for state in JobState.allCases {
                print("  \(state.rawValue.padding(toLength: 10, withPad: " ", startingAt: 0)) \(statistics.counts[state, default: 0])")
            }
            print("  \("total".padding(toLength: 10, withPad: " ", startingAt: 0)) \(total)")
            if let perHour = statistics.jobsPerHour {
                print("throughput \(String(format: "%.1f", perHour)) jobs/h (\(statistics.succeededInWindow) in the last \(window))")
            } else {
                print("throughput none in the last \(window)")
            }
            let eta = statistics.etaMs.map { DurationText.describe(milliseconds: $0) } ?? "unknown"
            print("remaining  \(statistics.remaining), eta \(eta)")
            if !orphans.isEmpty {
                print("orphaned   \(orphans.count) running job\(orphans.count == 1 ? "" : "s") whose worker is gone:")
                for orphan in orphans { print("  job \(orphan.id): \(orphanNote(orphan))") }
            }
        }
    }
}
