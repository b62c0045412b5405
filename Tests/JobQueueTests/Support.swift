import Foundation
import JobQueue

/// A clock tests move by hand.
final class ManualClock: @unchecked Sendable {
    private let lock = NSLock()
    private var value: Int64

    init(_ start: Int64 = 1_700_000_000_000) { value = start }

    var now: Int64 { lock.withLock { value } }
    func advance(_ milliseconds: Int64) { lock.withLock { value += milliseconds } }
    var queueClock: QueueClock { QueueClock { self.now } }
}

/// Values gathered from several threads.
final class Collector<T>: @unchecked Sendable {
    private let lock = NSLock()
    private var storage: [T] = []
    func append(_ value: T) { lock.withLock { storage.append(value) } }
    func append(contentsOf values: [T]) { lock.withLock { storage += values } }
    var values: [T] { lock.withLock { storage } }
}

/// A fresh temporary directory, removed by the caller's `defer`.
func temporaryDirectory() throws -> URL {
    let url = FileManager.default.temporaryDirectory.appendingPathComponent("dllava-queue-tests-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
    return url
}

/// A queue in a fresh temporary directory with a hand-moved clock and a fixed jitter.
struct Fixture {
    let directory: URL
    let clock = ManualClock()
    let queue: JobQueue

    init(retryPolicy: RetryPolicy = RetryPolicy(baseMs: 1_000, capMs: 60_000, jitter: { 0.5 })) throws {
        directory = try temporaryDirectory()
        queue = try JobQueue(path: directory.appendingPathComponent("queue.sqlite").path, create: true,
                             clock: clock.queueClock, retryPolicy: retryPolicy)
    }

    var databasePath: String { directory.appendingPathComponent("queue.sqlite").path }

    func remove() { try? FileManager.default.removeItem(at: directory) }

    /// `count` distinct jobs (by custom id) on one made-up image hash.
    func jobs(_ count: Int, prefix: String = "job", priority: Int = 0, maxAttempts: Int = 3) -> [NewJob] {
        (0..<count).map { i in
            NewJob(customID: "\(prefix)-\(i)", imagePath: "/images/\(i).jpg", imageSHA256: String(repeating: "a", count: 64),
                   prompt: "Describe the image.", priority: priority, maxAttempts: maxAttempts)
        }
    }

    /// Writes `contents` to `name` under the fixture's directory (creating folders) and returns its URL.
    @discardableResult
    func file(_ name: String, _ contents: String) throws -> URL {
        let url = directory.appendingPathComponent(name)
        try FileManager.default.createDirectory(at: url.deletingLastPathComponent(), withIntermediateDirectories: true)
        try Data(contents.utf8).write(to: url)
        return url
    }
}
