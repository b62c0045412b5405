import CommandLineSupport
import Foundation
import JobQueue
import PostgresQueue
import Testing

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

/// The two implementations of the queue contract.
enum Backend: String, CaseIterable, Sendable, CustomTestStringConvertible {
    case sqlite, postgres
    var testDescription: String { rawValue }
}

/// A fresh queue with a hand-moved clock and a fixed jitter: an SQLite file in a temporary directory, or a new
/// database on the test PostgreSQL server (`TestPostgres`; a server that cannot start fails the test).
struct Fixture {
    let backend: Backend
    let directory: URL
    let clock = ManualClock()
    let retryPolicy: RetryPolicy
    /// The SQLite file or the PostgreSQL URL.
    let location: String
    let queue: JobQueue

    init(_ backend: Backend = .sqlite, retryPolicy: RetryPolicy = RetryPolicy(baseMs: 1_000, capMs: 60_000, jitter: { 0.5 })) throws {
        self.backend = backend
        self.retryPolicy = retryPolicy
        directory = try temporaryDirectory()
        switch backend {
        case .sqlite:
            location = directory.appendingPathComponent("queue.sqlite").path
            queue = try SQLiteJobQueue(path: location, create: true, clock: clock.queueClock, retryPolicy: retryPolicy)
        case .postgres:
            location = try TestPostgres.shared().createDatabase()
            queue = try PostgresJobQueue(url: location, access: .create, clock: clock.queueClock, retryPolicy: retryPolicy)
        }
    }

    var databasePath: String { directory.appendingPathComponent("queue.sqlite").path }

    /// A second queue object on the same queue (another pool on the file, another connection to the server).
    func reopen() throws -> JobQueue {
        switch backend {
        case .sqlite: try SQLiteJobQueue(path: location, busyTimeout: 30, clock: clock.queueClock, retryPolicy: retryPolicy)
        case .postgres: try PostgresJobQueue(url: location, clock: clock.queueClock, retryPolicy: retryPolicy)
        }
    }

    func remove() {
        try? FileManager.default.removeItem(at: directory)
        if backend == .postgres, let name = location.split(separator: "/").last {
            _ = try? TestPostgres.shared().psql("DROP DATABASE IF EXISTS \(name) WITH (FORCE)")
        }
    }

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
