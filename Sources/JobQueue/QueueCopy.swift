import Foundation

/// `dllava copy`: moves a queue from one backend to another (SQLite to PostgreSQL when a queue outgrows one machine,
/// and back), every job as it is, without running anything again. The copy keeps the queue's identity, so result and
/// snapshot files already written under `<out>/<queue id>/` are the copy's, and it never hands out an id the original
/// did. Stop the workers first: a job running during the copy is copied as running and is rescued when its lease
/// expires.
public enum QueueCopy {
    /// What a copy did.
    public struct Report: Sendable, Hashable {
        public var jobs = 0
        public var identity = ""
    }

    /// Copies every job of `source` into `target`, which must hold no jobs (`QueueCopyError.targetNotEmpty`), in
    /// transactions of `jobQueueChunkSize` jobs read from one consistent snapshot of `source`.
    public static func copy(from source: JobQueue, to target: JobQueue) throws -> Report {
        let present = try target.counts().values.reduce(0, +)
        if present > 0 { throw QueueCopyError.targetNotEmpty(location: target.location, jobs: present) }
        try target.adoptIdentity(source.identity, highestID: try source.highestJobID())
        var report = Report(identity: source.identity)
        var pending: [Job] = []
        try source.forEach(.all) { job in
            pending.append(job)
            if pending.count == jobQueueChunkSize {
                try target.insertCopies(of: pending)
                report.jobs += pending.count
                pending.removeAll(keepingCapacity: true)
            }
        }
        try target.insertCopies(of: pending)
        report.jobs += pending.count
        return report
    }
}

public enum QueueCopyError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The target already holds jobs: a copy never merges two queues.
    case targetNotEmpty(location: String, jobs: Int)

    public var description: String {
        switch self {
        case let .targetNotEmpty(location, jobs):
            "\(location) already holds \(jobs) job\(jobs == 1 ? "" : "s"); copy into a new, empty queue (dllava init --db ...)"
        }
    }
}
