import Foundation

/// Exponential backoff with jitter for transient failures: after attempt `n` (1-based) the job waits
/// `e/2 + j * e/2` milliseconds, where `e = min(cap, base * 2^(n-1))` and `j` in [0, 1) comes from `jitter`
/// ("equal jitter": never less than half the exponential delay, never more than the cap).
///
/// A worker's death (its lease expired, or its process is gone) is not a failure: it charges the attempt only to a job
/// that made no progress during it, and a job fails for deaths alone once it was present at `deathLimit` deaths in a
/// row without progress ("suspected of crashing the worker"; docs/FORMATS.md, "Worker deaths and progress").
public struct RetryPolicy: Sendable {
    public var baseMs: Int64
    public var capMs: Int64
    /// A number in [0, 1) per call; tests pass a constant.
    public var jitter: @Sendable () -> Double
    /// Worker deaths in a row without progress after which a job fails as suspected of crashing the worker.
    public var deathLimit: Int

    /// The default of `deathLimit`.
    public static let defaultDeathLimit = 3

    public init(baseMs: Int64 = 10_000, capMs: Int64 = 3_600_000, deathLimit: Int = RetryPolicy.defaultDeathLimit,
                jitter: @escaping @Sendable () -> Double = { Double.random(in: 0..<1) }) {
        precondition(baseMs >= 1 && capMs >= baseMs, "RetryPolicy needs 1 <= base <= cap")
        precondition(deathLimit >= 1, "RetryPolicy needs a death limit of at least 1")
        self.baseMs = baseMs
        self.capMs = capMs
        self.deathLimit = deathLimit
        self.jitter = jitter
    }

    /// The wait before the retry that follows failed attempt `attempt` (1-based).
    public func delay(afterAttempt attempt: Int) -> Int64 {
        let shift = min(max(attempt - 1, 0), 62)
        let exponential = baseMs > (capMs >> shift) ? capMs : min(capMs, baseMs << shift)
        let half = exponential / 2
        let j = min(max(jitter(), 0), 1)
        return exponential - half + Int64((Double(half) * j).rounded(.down))
    }
}

/// The queue's source of time, Unix milliseconds. Tests inject a clock they move by hand.
public struct QueueClock: Sendable {
    public var now: @Sendable () -> Int64

    public init(now: @escaping @Sendable () -> Int64) { self.now = now }

    public static let system = QueueClock { Int64((Date().timeIntervalSince1970 * 1000).rounded(.down)) }
}
