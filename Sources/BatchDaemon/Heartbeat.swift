// Keeps the leases of the running batch's jobs alive from a thread of its own, so long matrix
// products never starve it, and records the leases it finds lost.
import Foundation
import JobQueue

/// A thread that renews the leases of the jobs it tracks every `1 / heartbeatsPerLease` of the
/// lease, and records the progress the loop last gave for each (so that a worker's death costs a job
/// that progressed no attempt: docs/FORMATS.md, "Worker deaths and progress"). Jobs enter when
/// claimed and leave when settled; a lease found lost (the job rescued by another worker, or
/// finalised) is reported through `lost` and the job is no longer renewed.
final class Heartbeat: @unchecked Sendable {
    private let lock = NSLock()
    private var tracked: Set<Int64> = []
    /// The latest progress of tracked jobs, sent with every beat.
    private var progress: [Int64: JobProgress] = [:]
    private var lostLeases: Set<Int64> = []
    private var stopped = false

    /// Starts the thread.
    init(queue: JobQueue, owner: String, leaseMilliseconds: Int64) {
        let interval = Double(leaseMilliseconds) / Double(DaemonOptions.heartbeatsPerLease) / 1000
        let thread = Thread { [self] in
            var next = Date().addingTimeInterval(interval)
            while !isStopped {
                Thread.sleep(forTimeInterval: min(0.2, interval))
                guard Date() >= next else { continue }
                let (ids, progress) = lock.withLock { (Array(tracked), self.progress) }
                if !ids.isEmpty,
                   let result = try? queue.heartbeat(jobs: ids, owner: owner, leaseDuration: leaseMilliseconds, progress: progress) {
                    lock.withLock {
                        lostLeases.formUnion(result.lost)
                        tracked.subtract(result.lost)
                    }
                }
                next = Date().addingTimeInterval(interval)
            }
        }
        thread.start()
    }

    func track(_ ids: [Int64]) { lock.withLock { tracked.formUnion(ids) } }

    func untrack(_ id: Int64) {
        lock.withLock {
            tracked.remove(id)
            lostLeases.remove(id)
            progress[id] = nil
        }
    }

    /// Records a tracked job's progress, sent at the next beat.
    func record(_ value: JobProgress, of id: Int64) { lock.withLock { progress[id] = value } }

    /// Jobs whose lease was found lost since they were tracked.
    var lost: Set<Int64> { lock.withLock { lostLeases } }

    private var isStopped: Bool { lock.withLock { stopped } }

    /// Ends the thread (at its next wake-up).
    func stop() { lock.withLock { stopped = true } }
}
