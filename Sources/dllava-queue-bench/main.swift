// Queue overhead: enqueue and claim+complete throughput on a fresh database file. Not a test: it asserts nothing
// and prints what this machine does.
//
//   swift build -c release --product dllava-queue-bench
//   .build/release/dllava-queue-bench --jobs 100000 --batch 1 --batch 8 --workers 1 --workers 4
import ArgumentParser
import Foundation
import JobQueue

@main
struct QueueBenchmark: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dllava-queue-bench",
        abstract: "Measure enqueue and claim+complete throughput (jobs/s) of the SQLite job queue.")

    @Option(help: "Jobs per run.")
    var jobs = 100_000

    @Option(help: "Jobs claimed per claim call (repeatable; one claim+complete run per value and --workers value).")
    var batch: [Int] = [1, 8]

    @Option(help: "Threads claiming and completing at once, each with its own owner name (repeatable).")
    var workers: [Int] = [1]

    @Option(help: "Folder for the database files (default: a new temporary folder, removed afterwards).")
    var directory: String?

    @Option(help: "full (fsync every commit, the queue's default) or normal (fsync at checkpoints; repeatable).")
    var durability: [String] = ["full"]

    @Flag(help: "Also time enqueueing the same number of jobs from a JSONL manifest (parse, hash, insert).")
    var manifest = false

    func run() throws {
        let folder = directory.map(URL.init(fileURLWithPath:))
            ?? FileManager.default.temporaryDirectory.appendingPathComponent("dllava-queue-bench-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        defer { if directory == nil { try? FileManager.default.removeItem(at: folder) } }
        print("machine: \(ProcessInfo.processInfo.activeProcessorCount) cores, \(ProcessInfo.processInfo.operatingSystemVersionString)")
        print("folder: \(folder.path) (SQLite WAL, one write transaction per claim and per completion, enqueue in transactions of 1,000)")

        for durabilityName in durability {
            guard let durabilityMode = JobQueue.Durability(rawValue: durabilityName) else {
                throw ValidationError("--durability must be full or normal")
            }
            for batchSize in batch {
                for workerCount in workers {
                    let path = folder.appendingPathComponent("bench-\(durabilityName)-\(batchSize)-\(workerCount).sqlite").path
                    let queue = try JobQueue(path: path, create: true, durability: durabilityMode)
                    let newJobs = (0..<jobs).map { i in
                        NewJob(customID: "job-\(i)", imagePath: "/images/\(i % 1000).jpg",
                               imageSHA256: String(repeating: "0", count: 64), prompt: "Describe the image in detail.",
                               parameters: JobParameters(maxTokens: 64, temperature: 0, seed: UInt64(i % 5)))
                    }
                    var start = Date()
                    try queue.enqueue(newJobs)
                    let enqueueSeconds = Date().timeIntervalSince(start)

                    start = Date()
                    let failures = Failures()
                    DispatchQueue.concurrentPerform(iterations: workerCount) { worker in
                        do {
                            let owner = "bench-\(worker)"
                            while true {
                                let claimed = try queue.claim(owner: owner, limit: batchSize, leaseDuration: 600_000)
                                if claimed.isEmpty { break }
                                for job in claimed {
                                    guard try queue.complete(job: job.id, attempt: job.attempt, owner: owner,
                                                             output: JobOutput(path: "/out/\(job.id)-\(job.attempt).json.zst",
                                                                               sha256: String(repeating: "1", count: 64))) else {
                                        failures.add("job \(job.id): completion refused")
                                        continue
                                    }
                                }
                            }
                        } catch {
                            failures.add("\(error)")
                        }
                    }
                    let claimSeconds = Date().timeIntervalSince(start)
                    let succeeded = try queue.counts()[.succeeded, default: 0]
                    print(String(format: "durability %@  jobs %d  batch %d  workers %d  enqueue %.0f jobs/s (%.2f s)  claim+complete %.0f jobs/s (%.2f s)  succeeded %d%@",
                                 durabilityName, jobs, batchSize, workerCount, Double(jobs) / enqueueSeconds, enqueueSeconds,
                                 Double(jobs) / claimSeconds, claimSeconds, succeeded,
                                 failures.all.isEmpty ? "" : "  FAILURES: \(failures.all.prefix(3))"))
                }
        }
        }

        if manifest {
            let image = folder.appendingPathComponent("tiny.png")
            try Data(repeating: 7, count: 4_096).write(to: image)
            let url = folder.appendingPathComponent("manifest.jsonl")
            var text = ""
            text.reserveCapacity(jobs * 100)
            for i in 0..<jobs {
                text += #"{"custom_id": "m\#(i)", "image": "tiny.png", "prompt": "Describe image \#(i % 10).", "max_tokens": 64}"# + "\n"
            }
            try Data(text.utf8).write(to: url)
            let queue = try JobQueue(path: folder.appendingPathComponent("manifest.sqlite").path, create: true)
            let start = Date()
            let report = try queue.enqueueJSONL(url)
            let seconds = Date().timeIntervalSince(start)
            print(String(format: "manifest %d lines  enqueueJSONL %.0f jobs/s (%.2f s)  inserted %d  problems %d",
                         jobs, Double(jobs) / seconds, seconds, report.inserted, report.problems.count))
        }
    }
}

final class Failures: @unchecked Sendable {
    private let lock = NSLock()
    private var messages: [String] = []
    func add(_ message: String) { lock.withLock { messages.append(message) } }
    var all: [String] { lock.withLock { messages } }
}
