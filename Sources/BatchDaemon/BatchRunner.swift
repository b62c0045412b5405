// The engine as the daemon sees it: a batch that jobs enter and leave at decode-step boundaries.
// The daemon never imports the model; the `dllava` executable implements these protocols, and
// snapshots cross as opaque payloads.
import Artifacts
import Foundation
import JobQueue

/// What the engine made of one job.
public enum JobOutcome<Stats: Codable & Sendable>: Sendable {
    case succeeded(text: String, tokenIDs: [Int32], finishReason: String, stats: Stats, timings: JobTimings)
    /// `permanent`: the job can never succeed (an undecodable image, a prompt longer than the
    /// context); otherwise it is retried with backoff.
    case failed(reason: String, permanent: Bool)
}

/// A job entering a running batch.
public struct BatchEntry: Sendable {
    public var job: Job
    /// The job's image file, read once and checked against the sha256 recorded at enqueue: the
    /// engine decodes these bytes, never the path again (the file may change).
    public var image: Data
    /// The payloads of the job's latest snapshot that make its state: its last full frame and the append frames
    /// after it, in order (checked against the job's identity and their checksums); nil when it has none.
    public var snapshot: [Data]?
    /// Where that snapshot was read from (a file path, or the queue's database), for messages.
    public var snapshotLocation: String

    public init(job: Job, image: Data, snapshot: [Data]?, snapshotLocation: String) {
        self.job = job
        self.image = image
        self.snapshot = snapshot
        self.snapshotLocation = snapshotLocation
    }
}

/// The engine's side of a running batch, driven by the daemon one decode step at a time (as a
/// llama.cpp server drives `llama_decode`). Jobs are named by their ids. A job's outcome must not
/// depend on which jobs share its steps, nor on when it entered the batch.
public protocol RunningBatch: AnyObject {
    associatedtype Stats: Codable & Sendable
    /// Jobs in the batch still generating, in the order they entered.
    var generating: [Int64] { get }
    /// Jobs in the batch that finished and wait for `remove`.
    var finished: [Int64] { get }
    /// Adds jobs, running vision and prefill for all of them together. A job with a snapshot goes
    /// on from it and says so through `log`; when the engine cannot use the snapshot, it logs why
    /// and the job starts from scratch. Returns the outcome of each job that could not enter (a
    /// bad image, a prompt longer than the context, a mode the model cannot run); the others are
    /// in the batch, possibly finished already.
    func add(_ entries: [BatchEntry], log: (String) -> Void) -> [Int64: JobOutcome<Stats>]
    /// One decode step: a token for every generating job.
    func step()
    /// A snapshot frame of the job's state, generating or finished; nil when it has none (a job decoding without a
    /// KV cache). `incremental`: the job's previous frame (the last one this call gave, or the snapshot the job
    /// resumed from) is stored, so an append frame of what changed since will do. The engine gives a full frame
    /// anyway when it has no previous frame of the job, or when the job's cells changed in a way an append frame
    /// cannot say (cells lost or reordered).
    func snapshot(job: Int64, incremental: Bool) -> SnapshotFrame?
    /// Takes the job out of the batch: its outcome when it had finished, nil when it had not.
    func remove(job: Int64) -> JobOutcome<Stats>?
    /// How long the stages of the last `add` took, for metrics; nil when the engine does not measure them.
    var lastAdmissionTimings: AdmissionTimings? { get }
    /// A finished job's figures for metrics (image tokens, KV cells); nil when the engine has none.
    func measurements(of stats: Stats) -> JobMeasurements?
}

extension RunningBatch {
    public var lastAdmissionTimings: AdmissionTimings? { nil }
    public func measurements(of stats: Stats) -> JobMeasurements? { nil }
}

/// Makes the batches the daemon drives.
public protocol BatchRunner: Sendable {
    associatedtype Batch: RunningBatch
    /// Identifies the model in result and snapshot files.
    var fingerprint: ModelFingerprint { get }
    /// The most a job's snapshot can hold on this model (layers, K/V width, context): larger snapshots are refused
    /// unread and their jobs start from scratch.
    var snapshotLimits: SnapshotLimits { get }
    /// A new, empty batch.
    func makeBatch() -> Batch
}
