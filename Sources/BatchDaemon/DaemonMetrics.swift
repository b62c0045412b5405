// What a run counts and times, through swift-metrics: the exporter (Prometheus, in the Telemetry target) is chosen by
// whoever makes the factory; with none the metrics cost nothing.
import CoreMetrics
import Foundation

/// Figures of one finished job that only the engine knows, for metrics.
public struct JobMeasurements: Sendable, Equatable {
    public var imageTokensTotal: Int
    public var imageTokensKept: Int
    /// KV cells the job held at the end, summed over the decoder layers.
    public var keyValueCellsKept: Int

    public init(imageTokensTotal: Int, imageTokensKept: Int, keyValueCellsKept: Int) {
        self.imageTokensTotal = imageTokensTotal
        self.imageTokensKept = imageTokensKept
        self.keyValueCellsKept = keyValueCellsKept
    }
}

/// How long the stages of one admission took (the jobs entering a batch together), for metrics.
public struct AdmissionTimings: Sendable, Equatable {
    public var imageDecodeSeconds: Double
    public var visionSeconds: Double
    public var prefillSeconds: Double
    /// Time spent packing weights on their first use (a fresh process's first admissions), apart from the stages.
    public var packingSeconds: Double
    /// Jobs that took their image prefix (vision and the prompt's shared part) from the prefix cache.
    public var sharedPrefixJobs: Int

    public init(imageDecodeSeconds: Double, visionSeconds: Double, prefillSeconds: Double, packingSeconds: Double = 0, sharedPrefixJobs: Int = 0) {
        self.imageDecodeSeconds = imageDecodeSeconds
        self.visionSeconds = visionSeconds
        self.prefillSeconds = prefillSeconds
        self.packingSeconds = packingSeconds
        self.sharedPrefixJobs = sharedPrefixJobs
    }
}

/// The metrics of the daemon, named as Prometheus expects (`_total` counters, `_seconds` histograms). Documented in
/// docs/OPERATIONS.md ("Metrics").
public struct DaemonMetrics: Sendable {
    public let jobsClaimed: Counter
    public let jobsSucceeded: Counter
    public let jobsFailed: Counter
    public let jobsRetried: Counter
    public let jobsCancelled: Counter
    /// Jobs handed back to the queue by a graceful shutdown or a fault.
    public let jobsReleased: Counter
    /// Running jobs dropped, or results refused, because another worker had taken the job over.
    public let leaseLosses: Counter
    public let tokensGenerated: Counter
    public let imageTokensTotal: Counter
    public let imageTokensKept: Counter
    public let keyValueCellsKept: Counter
    /// Bytes of KV snapshot frames stored (appended, or written whole).
    public let snapshotBytesWritten: Counter
    /// Jobs waiting to be claimed (available or retryable), read at each admission and when the batch empties.
    public let queueDepth: Gauge
    public let jobsRunning: Gauge
    /// Stage latencies, one histogram with a `stage` label: image_decode, vision, prefill (per admission),
    /// decode_step (per step of the batch), result_write (per job: the result file and the completion),
    /// snapshot_write (per snapshot frame: taken, encoded and stored).
    public let imageDecode: CoreMetrics.Timer
    public let vision: CoreMetrics.Timer
    public let prefill: CoreMetrics.Timer
    public let decodeStep: CoreMetrics.Timer
    public let resultWrite: CoreMetrics.Timer
    public let snapshotWrite: CoreMetrics.Timer

    public static let stageHistogram = "dllava_stage_duration_seconds"

    public init(factory: MetricsFactory = MetricsSystem.factory) {
        func counter(_ name: String) -> Counter { Counter(label: name, factory: factory) }
        func stage(_ name: String) -> CoreMetrics.Timer { CoreMetrics.Timer(label: Self.stageHistogram, dimensions: [("stage", name)], factory: factory) }
        jobsClaimed = counter("dllava_jobs_claimed_total")
        jobsSucceeded = counter("dllava_jobs_succeeded_total")
        jobsFailed = counter("dllava_jobs_failed_total")
        jobsRetried = counter("dllava_jobs_retried_total")
        jobsCancelled = counter("dllava_jobs_cancelled_total")
        jobsReleased = counter("dllava_jobs_released_total")
        leaseLosses = counter("dllava_lease_losses_total")
        tokensGenerated = counter("dllava_tokens_generated_total")
        imageTokensTotal = counter("dllava_image_tokens_total")
        imageTokensKept = counter("dllava_image_tokens_kept_total")
        keyValueCellsKept = counter("dllava_kv_cells_kept_total")
        snapshotBytesWritten = counter("dllava_snapshot_bytes_written_total")
        queueDepth = Gauge(label: "dllava_queue_depth", factory: factory)
        jobsRunning = Gauge(label: "dllava_jobs_running", factory: factory)
        imageDecode = stage("image_decode")
        vision = stage("vision")
        prefill = stage("prefill")
        decodeStep = stage("decode_step")
        resultWrite = stage("result_write")
        snapshotWrite = stage("snapshot_write")
    }

    /// Counts what changed between two reports of the same run.
    func count(from before: DaemonReport, to after: DaemonReport) {
        jobsClaimed.increment(by: after.claimed - before.claimed)
        jobsSucceeded.increment(by: after.succeeded - before.succeeded)
        jobsFailed.increment(by: after.failed - before.failed)
        jobsRetried.increment(by: after.retried - before.retried)
        jobsCancelled.increment(by: after.cancelled - before.cancelled)
        jobsReleased.increment(by: after.released - before.released)
        leaseLosses.increment(by: after.discarded - before.discarded)
        tokensGenerated.increment(by: after.generatedTokens - before.generatedTokens)
    }

    func record(_ timings: AdmissionTimings) {
        imageDecode.recordSeconds(timings.imageDecodeSeconds)
        vision.recordSeconds(timings.visionSeconds)
        prefill.recordSeconds(timings.prefillSeconds)
    }

    func record(_ measurements: JobMeasurements) {
        imageTokensTotal.increment(by: measurements.imageTokensTotal)
        imageTokensKept.increment(by: measurements.imageTokensKept)
        keyValueCellsKept.increment(by: measurements.keyValueCellsKept)
    }
}
