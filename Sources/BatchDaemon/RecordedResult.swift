import Artifacts
import Foundation
import JobQueue

/// The one way the readers of a finished queue (`export`, its sidecars, `report`) get a succeeded job's result, from
/// whichever store holds it.
public enum RecordedResult {
    /// The result `job` recorded, checked against its sha256 and decoded as `type`: from the queue's database when it
    /// stores results (PostgreSQL), else (or for a job that finished before results were stored there) from the file
    /// its row records. Throws `ArtifactError` (missing, unreadable, altered or malformed) or `JobQueueError` (the
    /// database could not be read).
    public static func read<R: Decodable>(_ type: R.Type, of job: Job, in queue: JobQueue) throws -> R {
        if let stored = queue.storedArtifacts {
            let place = "the stored result of attempt \(job.attempt) in \(stored.location)"
            if let bytes = try stored.result(of: job) {
                return try ResultFile.decode(type, from: bytes, path: place, expectedSHA256: job.outputSHA256)
            }
            if job.outputPath == nil { throw ArtifactError.malformedResult(path: place, reason: "it is missing") }
        }
        guard let path = job.outputPath else { throw ArtifactError.malformedResult(path: "-", reason: "no result file recorded") }
        return try ResultFile.read(type, from: URL(fileURLWithPath: path), expectedSHA256: job.outputSHA256)
    }
}
