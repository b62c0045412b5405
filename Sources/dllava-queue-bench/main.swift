// Queue overhead: enqueue and claim+complete throughput on a fresh database file, or on a PostgreSQL queue. Not a
// test: it asserts nothing and prints what this machine does.
//
//   swift build -c release --product dllava-queue-bench
//   .build/release/dllava-queue-bench --jobs 100000 --batch 1 --batch 8 --workers 1 --workers 4
//   .build/release/dllava-queue-bench --postgres postgres://user@127.0.0.1:5432/bench --workers 1 --workers 4 --workers 16
//   .build/release/dllava-queue-bench --postgres postgres://... --result-bytes 2048 --snapshot-bytes 65536
import ArgumentParser
import Artifacts
import Foundation
import JobQueue
import PostgresQueue

@main
struct QueueBenchmark: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dllava-queue-bench",
        abstract: "Measure enqueue and claim+complete throughput (jobs/s) of the SQLite or the PostgreSQL job queue.")

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

    @Option(help: """
        Measure the PostgreSQL queue in this database instead (created with `init` when it has none; each run adds its \
        own jobs, so earlier runs' rows stay). Every worker thread has its own connection, as separate processes would.
        """)
    var postgres: String?

    @Option(name: .customLong("result-bytes"), help: """
        Store a result of this many bytes with each completion, as `dllava run` does: a file written atomically in the \
        folder (SQLite), or a row in the database (PostgreSQL). 0: none (the queue's work alone).
        """)
    var resultBytes = 0

    @Option(name: .customLong("snapshot-bytes"), help: "Also store one snapshot of this many bytes per job before its completion, and delete it after (0: none).")
    var snapshotBytes = 0

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

        if let postgres {
            say("PostgreSQL: \((try? PostgresAddress(postgres).description) ?? postgres) (one connection per worker, SKIP LOCKED claims, "
                + "one transaction per claim and per completion)")
        }
        for durabilityName in postgres == nil ? durability : ["server"] {
            let durabilityMode = SQLiteJobQueue.Durability(rawValue: durabilityName)
            if postgres == nil && durabilityMode == nil { throw ValidationError("--durability must be full or normal") }
            for batchSize in batch {
                for workerCount in workers {
                    let path = folder.appendingPathComponent("bench-\(durabilityName)-\(batchSize)-\(workerCount).sqlite").path
                    let queue: JobQueue = if let postgres {
                        try PostgresJobQueue(url: postgres, access: .create)
                    } else {
                        try SQLiteJobQueue(path: path, create: true, durability: durabilityMode ?? .full)
                    }
                    let run = UUID().uuidString.prefix(8)
                    let newJobs = (0..<jobs).map { i in
                        NewJob(customID: "\(run)-job-\(i)", imagePath: "/images/\(i % 1000).jpg",
                               imageSHA256: String(repeating: "0", count: 64), prompt: "Describe the image in detail.",
                               parameters: JobParameters(maxTokens: 64, temperature: 0, seed: UInt64(i % 5)))
                    }
                    var start = Date()
                    try queue.enqueue(newJobs)
                    let enqueueSeconds = Date().timeIntervalSince(start)

                    let failures = Failures()
                    // SQLite: one pool for all threads (its writes are serialised anyway); PostgreSQL: a connection each.
                    let workerQueues: [JobQueue] = try (0..<workerCount).map { _ in
                        if let postgres { try PostgresJobQueue(url: postgres) } else { queue }
                    }
                    let results = folder.appendingPathComponent("results-\(run)")
                    try FileManager.default.createDirectory(at: results, withIntermediateDirectories: true)
                    let record = Data((0..<resultBytes).map { UInt8(truncatingIfNeeded: $0 &* 7) })
                    let snapshot = Data((0..<snapshotBytes).map { UInt8(truncatingIfNeeded: $0 &* 13) })
                    start = Date()
                    // A thread per worker (concurrentPerform would run only as many at once as there are cores).
                    let finished = DispatchGroup()
                    for worker in 0..<workerCount {
                        finished.enter()
                        Thread {
                            defer { finished.leave() }
                            let queue = workerQueues[worker]
                            do {
                                let owner = "bench-\(run)-\(worker)"
                                while true {
                                    let claimed = try queue.claim(owner: owner, limit: batchSize, leaseDuration: 600_000)
                                    if claimed.isEmpty { break }
                                    for job in claimed {
                                        var output = JobOutput(path: "/out/\(job.id)-\(job.attempt).json.zst", sha256: String(repeating: "1", count: 64))
                                        if snapshotBytes > 0 { try store(snapshot: snapshot, of: job, queue: queue, in: results) }
                                        if resultBytes > 0 { output = try store(result: record, of: job, queue: queue, in: results) }
                                        defer { if snapshotBytes > 0 { try? removeSnapshot(of: job, queue: queue, in: results) } }
                                        guard try queue.complete(job: job.id, attempt: job.attempt, owner: owner, output: output) else {
                                            failures.add("job \(job.id): completion refused")
                                            continue
                                        }
                                        failures.complete()
                                    }
                                }
                            } catch {
                                failures.add("\(error)")
                            }
                        }.start()
                    }
                    finished.wait()
                    let claimSeconds = Date().timeIntervalSince(start)
                    let succeeded = failures.completed
                    say(String(format: "durability %@  jobs %d  batch %d  workers %d  result %d B  snapshot %d B  enqueue %.0f jobs/s (%.2f s)  claim+complete %.0f jobs/s (%.2f s)  succeeded %d%@",
                                 durabilityName, jobs, batchSize, workerCount, resultBytes, snapshotBytes, Double(jobs) / enqueueSeconds, enqueueSeconds,
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
            let queue = try SQLiteJobQueue(path: folder.appendingPathComponent("manifest.sqlite").path, create: true)
            let start = Date()
            let report = try queue.enqueueJSONL(url)
            let seconds = Date().timeIntervalSince(start)
            say(String(format: "manifest %d lines  enqueueJSONL %.0f jobs/s (%.2f s)  inserted %d  problems %d",
                         jobs, Double(jobs) / seconds, seconds, report.inserted, report.problems.count))
        }
    }
}

/// Stores `record` as `job`'s result the way `dllava run` does: in the queue's database when it stores results, else as
/// a file written atomically in `folder`; what `complete` then records.
func store(result record: Data, of job: Job, queue: JobQueue, in folder: URL) throws -> JobOutput {
    if let stored = queue.storedArtifacts {
        let result = try stored.putResult(record, job: job.id, attempt: job.attempt)
        return JobOutput(path: result.path, sha256: result.sha256)
    }
    let written = try AtomicFile.write(record, to: folder.appendingPathComponent("\(job.id)-\(job.attempt).json.zst"))
    return JobOutput(path: written.url.path, sha256: written.sha256)
}

/// Stores `snapshot` as `job`'s snapshot: in the queue's database, or as a file in `folder`.
func store(snapshot: Data, of job: Job, queue: JobQueue, in folder: URL) throws {
    if let stored = queue.storedArtifacts { return try stored.putSnapshot(snapshot, job: job.id) }
    _ = try AtomicFile.write(snapshot, to: folder.appendingPathComponent("job-\(job.id).kv.zst"))
}

func removeSnapshot(of job: Job, queue: JobQueue, in folder: URL) throws {
    if let stored = queue.storedArtifacts { return try stored.removeSnapshot(job: job.id) }
    unlink(folder.appendingPathComponent("job-\(job.id).kv.zst").path)
}

/// What the worker threads of one run report: accepted completions, and failures.
final class Failures: @unchecked Sendable {
    private let lock = NSLock()
    private var messages: [String] = []
    private var completions = 0
    func add(_ message: String) { lock.withLock { messages.append(message) } }
    func complete() { lock.withLock { completions += 1 } }
    var all: [String] { lock.withLock { messages } }
    var completed: Int { lock.withLock { completions } }
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
