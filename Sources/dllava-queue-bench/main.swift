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
        say("machine: \(ProcessInfo.processInfo.activeProcessorCount) cores, \(ProcessInfo.processInfo.operatingSystemVersionString)")
        say("folder: \(folder.path) (SQLite WAL, one write transaction per claim and per completion, enqueue in transactions of 1,000)")
        let load = (try? String(contentsOfFile: "/proc/loadavg", encoding: .utf8))?.split(separator: " ").prefix(3).joined(separator: " ")
        say("load average: \(load ?? "unknown"); fsync of 4 KiB in this folder: median \(String(format: "%.2f", try fsyncMilliseconds(in: folder))) ms")

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
                    say(String(format: "durability %@  jobs %d  batch %d  workers %d  enqueue %.0f jobs/s (%.2f s)  claim+complete %.0f jobs/s (%.2f s)  succeeded %d%@",
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
            say(String(format: "manifest %d lines  enqueueJSONL %.0f jobs/s (%.2f s)  inserted %d  problems %d",
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

/// Median time of 31 write(4 KiB) + fsync pairs on one file: what a durable commit costs on this disk right now.
func fsyncMilliseconds(in folder: URL) throws -> Double {
    let path = folder.appendingPathComponent("fsync-probe").path
    let descriptor = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
    guard descriptor >= 0 else { throw CocoaError(.fileWriteUnknown) }
    defer { close(descriptor); unlink(path) }
    let block = [UInt8](repeating: 1, count: 4_096)
    var times: [Double] = []
    for _ in 0..<31 {
        let start = DispatchTime.now().uptimeNanoseconds
        _ = block.withUnsafeBytes { write(descriptor, $0.baseAddress, $0.count) }
        fsync(descriptor)
        times.append(Double(DispatchTime.now().uptimeNanoseconds - start) / 1e6)
    }
    return times.sorted()[times.count / 2]
}

/// Prints at once, even into a pipe (a long run shows its lines as they come).
func say(_ line: String) {
    FileHandle.standardOutput.write(Data((line + "\n").utf8))
}
