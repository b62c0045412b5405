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
        /// Result records and snapshots moved into the target's storage.
        public var results = 0
        public var snapshots = 0
        /// Succeeded jobs whose result could not be read from the source (a file gone or changed), one sentence each:
        /// the job is copied, its result is not.
        public var unreadableResults: [String] = []
    }

    /// Copies every job of `source` into `target`, which must hold no jobs (`QueueCopyError.targetNotEmpty`), in
    /// transactions of `jobQueueChunkSize` jobs read from one consistent snapshot of `source`, and moves results and
    /// snapshots where the target keeps them:
    /// - into a target that stores them (PostgreSQL): each succeeded job's result (from the source's database, or the
    ///   file its row records, checked against its sha256) and each job's snapshot (likewise, or the recorded file);
    /// - from a source that stores them into one that does not (SQLite): as files in `files(identity)`, the copy's
    ///   folder `<out>/<queue id>/` (`QueueCopyError.needsOutputFolder` when nil), whose paths the copied rows record;
    /// - between two queues that keep files, nothing moves: the copied rows record the same paths.
    public static func copy(from source: JobQueue, to target: JobQueue,
                            files: ((_ identity: String) throws -> ArtifactStore)? = nil) throws -> Report {
        let present = try target.counts().values.reduce(0, +)
        if present > 0 { throw QueueCopyError.targetNotEmpty(location: target.location, jobs: present) }
        try target.adoptIdentity(source.identity, highestID: try source.highestJobID())
        var report = Report(identity: source.identity)
        let fromDatabase = source.storedArtifacts
        let intoFiles = target.storedArtifacts == nil && fromDatabase != nil ? try files?(source.identity) : nil
        var pending: [Job] = []
        func flush() throws {
            if target.storedArtifacts == nil, let fromDatabase {
                // A job without a stored result keeps the file its row records (a result from before results were stored).
                for index in pending.indices where pending[index].state == .succeeded {
                    let job = pending[index]
                    guard let record = try fromDatabase.result(of: job) else { continue }
                    guard let intoFiles else { throw QueueCopyError.needsOutputFolder(source: source.location, target: target.location) }
                    if let problem = mismatch(record, of: job, at: "its stored result in \(fromDatabase.location)") {
                        report.unreadableResults.append(problem)
                        continue
                    }
                    pending[index].outputPath = try intoFiles.putResult(record, job: job.id, attempt: job.attempt).path
                    report.results += 1
                }
            }
            try target.insertCopies(of: pending)
            report.jobs += pending.count
            if let into = target.storedArtifacts {
                for job in pending where job.state == .succeeded {
                    do {
                        _ = try into.putResult(try result(of: job, in: source), job: job.id, attempt: job.attempt)
                        report.results += 1
                    } catch let problem as UnreadableResult {
                        report.unreadableResults.append(problem.reason)
                    }
                }
            }
            if let into = target.storedArtifacts ?? intoFiles {
                for job in pending {
                    guard let snapshot = try fromDatabase?.snapshot(job: job.id) ?? recordedSnapshot(of: job) else { continue }
                    try into.putSnapshot(snapshot, job: job.id)
                    report.snapshots += 1
                }
            } else if let fromDatabase {
                for job in pending {
                    if try fromDatabase.snapshot(job: job.id) != nil {
                        throw QueueCopyError.needsOutputFolder(source: source.location, target: target.location)
                    }
                }
            }
            pending.removeAll(keepingCapacity: true)
        }
        try source.forEach(.all) { job in
            pending.append(job)
            if pending.count == jobQueueChunkSize { try flush() }
        }
        try flush()
        return report
    }

    /// Why a succeeded job's result could not be read from the source.
    struct UnreadableResult: Error {
        var reason: String
    }

    /// A succeeded job's result record: from `queue`'s database when it stores it, else from the file its row records;
    /// either way checked against the recorded sha256.
    static func result(of job: Job, in queue: JobQueue) throws -> Data {
        let record: Data
        let place: String
        if let stored = queue.storedArtifacts, let bytes = try stored.result(of: job) {
            place = "its stored result in \(stored.location)"
            record = bytes
        } else {
            // A job that finished before results were stored in the database has its file.
            guard let path = job.outputPath else {
                throw UnreadableResult(reason: "job \(job.id) succeeded but has no stored result and records no result file")
            }
            place = path
            do { record = try Data(contentsOf: URL(fileURLWithPath: path)) } catch {
                throw UnreadableResult(reason: "job \(job.id): cannot read its result file \(path): \(error.localizedDescription)")
            }
        }
        if let problem = mismatch(record, of: job, at: place) { throw UnreadableResult(reason: problem) }
        return record
    }

    /// Why `record` is not the result `job` recorded (its sha256 differs), or nil when it is.
    static func mismatch(_ record: Data, of job: Job, at place: String) -> String? {
        let sha256 = Hashing.sha256Hex(record)
        return sha256 == job.outputSHA256 ? nil : "job \(job.id): \(place) has sha256 \(sha256), the job recorded \(job.outputSHA256 ?? "none")"
    }

    /// The snapshot file a job's row records, when it is still there.
    static func recordedSnapshot(of job: Job) -> Data? {
        guard let path = job.snapshotPath, Hashing.isRegularFile(path) else { return nil }
        return try? Data(contentsOf: URL(fileURLWithPath: path))
    }
}

public enum QueueCopyError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The target already holds jobs: a copy never merges two queues.
    case targetNotEmpty(location: String, jobs: Int)
    /// The source stores results or snapshots in its database and the target keeps files: they need a folder.
    case needsOutputFolder(source: String, target: String)

    public var description: String {
        switch self {
        case let .targetNotEmpty(location, jobs):
            "\(location) already holds \(jobs) job\(jobs == 1 ? "" : "s"); copy into a new, empty queue (dllava init --db ...)"
        case let .needsOutputFolder(source, target):
            "\(source) stores results and snapshots in its database and \(target) keeps them as files: give the folder for them with "
                + "--out (the jobs copied so far are in \(target); remove it and copy again)"
        }
    }
}
