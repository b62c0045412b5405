import ArgumentParser
import Artifacts
import BatchDaemon
import DynamicLLaVA
import Foundation
import JobQueue
import Llama
import Logging
import Numerics
import Telemetry

/// The engine as the daemon sees it: one LLaVA pipeline, loaded once.
struct EngineRunner: BatchRunner {
    let pipeline: LLaVAPipeline
    let fingerprint: ModelFingerprint
    /// Bytes each batch's image-prefix cache may hold (0: off).
    let prefixCacheBytes: Int

    /// The model is named in result and snapshot files by its contents: every weight, configuration and tokenizer
    /// file of the model directory and of its vision tower directory (`ModelFingerprint.content`). Digests of
    /// unchanged files come from `cache`, so a large checkpoint is read once, not at every start.
    init(pipeline: LLaVAPipeline, cache: FileDigestCache, prefixCacheBytes: Int = GenerationBatch.defaultPrefixCacheBytes) throws {
        self.pipeline = pipeline
        self.prefixCacheBytes = prefixCacheBytes
        let model = pipeline.model
        var files: [(label: String, url: URL)] = []
        let directories: [(role: String, directory: URL?)] = [("model", model.directory), ("vision", model.visionTowerDirectory)]
        for (role, directory) in directories {
            guard let directory, role == "model" || directory.standardizedFileURL != model.directory.standardizedFileURL else { continue }
            let names = (try? FileManager.default.contentsOfDirectory(atPath: directory.path)) ?? []
            for name in names.sorted() where Self.isModelFile(name) && Self.isRegularFile(directory.appendingPathComponent(name)) {
                files.append(("\(role)/\(name)", directory.appendingPathComponent(name)))
            }
        }
        fingerprint = try ModelFingerprint.content(of: files, name: model.directory.lastPathComponent, cache: cache)
    }

    /// A job's state holds at most every layer's cells for the whole context, at the precision of this run's cache.
    var snapshotLimits: SnapshotLimits {
        let c = pipeline.model.language.configuration
        let bounds = GenerationSnapshot.bounds(layers: c.hiddenLayers, keyValueWidth: c.keyValueWidth, contextLength: c.maxPositionEmbeddings,
                                               storage: KeyValueCache.storage(for: Kernels.precision))
        return SnapshotLimits(maxCells: bounds.maxCells, cellBytes: bounds.cellBytes, otherBytes: bounds.otherBytes)
    }

    /// Weights, configuration and tokenizer files: what decides the model's outputs.
    static func isModelFile(_ name: String) -> Bool {
        [".safetensors", ".json", ".model"].contains { name.hasSuffix($0) }
    }

    static func isRegularFile(_ url: URL) -> Bool {
        (try? url.resourceValues(forKeys: [.isRegularFileKey]).isRegularFile) == true
    }

    func makeBatch() -> EngineBatch { EngineBatch(pipeline: pipeline, prefixCacheBytes: prefixCacheBytes) }
}

/// A running batch of jobs on the engine: a `GenerationBatch` whose rows are jobs.
final class EngineBatch: RunningBatch {
    let pipeline: LLaVAPipeline
    var generation: GenerationBatch
    var rowOfJob: [Int64: GenerationBatch.Row] = [:]
    var jobOfRow: [GenerationBatch.Row: Int64] = [:]
    private(set) var lastAdmissionTimings: AdmissionTimings?

    init(pipeline: LLaVAPipeline, prefixCacheBytes: Int) {
        self.pipeline = pipeline
        generation = GenerationBatch(generator: pipeline.generator, prefixCacheBytes: prefixCacheBytes)
    }

    var generating: [Int64] { generation.generating.map { jobOfRow[$0]! } }
    var finished: [Int64] { generation.finished.map { jobOfRow[$0]! } }

    /// The generation parameters of a job: its own, the rest from the model's defaults.
    func parameters(_ job: Job) -> GenerationParameters {
        let p = job.parameters
        let mode = p.sparsity.flatMap { SparsityMode(rawValue: $0.rawValue) } ?? pipeline.generator.defaultSparsityMode
        return GenerationParameters(
            maxTokens: p.maxTokens ?? GenerationParameters.defaultMaxTokens,
            sampling: SamplingParameters(temperature: Float(p.temperature ?? 0), topK: p.topK ?? 0, topP: Float(p.topP ?? 1), seed: p.seed ?? 0),
            stop: p.stop ?? [], endOfSequence: pipeline.endOfSequenceTokenID,
            sparsity: SparsityParameters(mode: mode, visionKeepRate: p.visionKeepRate))
    }

    func add(_ entries: [BatchEntry], log: (String) -> Void) -> [Int64: JobOutcome<GenerationStats>] {
        var refused: [Int64: JobOutcome<GenerationStats>] = [:]
        var requests: [GenerationRequest] = [], snapshots: [GenerationSnapshot?] = [], jobs: [Int64] = []
        let generator = pipeline.generator
        let decodeStart = DispatchTime.now()
        for entry in entries {
            do {
                let request = try pipeline.request(imageData: entry.image, name: entry.job.imagePath, question: entry.job.prompt,
                                                   parameters: parameters(entry.job))
                try generator.validate([request])
                requests.append(request)
                snapshots.append(entry.snapshot.flatMap { resumableSnapshot($0, for: request, from: entry.snapshotLocation, log: log) })
                jobs.append(entry.job.id)
            } catch {
                // A bad image, a prompt longer than the context, a mode the model cannot run: never retried.
                refused[entry.job.id] = .failed(reason: "\(error)", permanent: true)
            }
        }
        let addStart = DispatchTime.now(), packingBefore = WeightPacking.milliseconds
        var sharedPrefixJobs = 0
        defer {
            let end = DispatchTime.now().uptimeNanoseconds
            let vision = generation.lastVisionMilliseconds / 1000, packing = (WeightPacking.milliseconds - packingBefore) / 1000
            lastAdmissionTimings = AdmissionTimings(imageDecodeSeconds: Double(addStart.uptimeNanoseconds - decodeStart.uptimeNanoseconds) / 1e9,
                                                    visionSeconds: vision,
                                                    prefillSeconds: max(0, Double(end - addStart.uptimeNanoseconds) / 1e9 - vision - packing),
                                                    packingSeconds: packing, sharedPrefixJobs: sharedPrefixJobs)
        }
        do {
            for (job, row) in zip(jobs, try generation.add(requests, resuming: snapshots)) {
                rowOfJob[job] = row
                jobOfRow[row] = job
                if generation.usedCachedPrefix(row) { sharedPrefixJobs += 1 }
            }
        } catch {
            // Each request was validated and each snapshot checked above: not expected, but never fatal to the daemon.
            for job in jobs { refused[job] = .failed(reason: "\(error)", permanent: false) }
        }
        return refused
    }

    func step() { generation.step() }

    func measurements(of stats: GenerationStats) -> JobMeasurements? {
        JobMeasurements(imageTokensTotal: stats.imageTokensTotal, imageTokensKept: stats.imageTokensKept,
                        keyValueCellsKept: stats.kvCellsPerLayer.reduce(0, +))
    }

    func snapshot(job: Int64, incremental: Bool) -> SnapshotFrame? {
        guard let row = rowOfJob[job], let frame = generation.snapshotFrame(row, incremental: incremental) else { return nil }
        return SnapshotFrame(kind: frame.isFull ? .full : .append, decodeSteps: frame.decodeSteps, cells: frame.cells, payload: frame.payload,
                             stateBytes: frame.stateBytes)
    }

    func remove(job: Int64) -> JobOutcome<GenerationStats>? {
        guard let row = rowOfJob.removeValue(forKey: job) else { return nil }
        jobOfRow[row] = nil
        let wasFinished = generation.isFinished(row)
        let result = generation.remove(row)
        guard wasFinished else { return nil }
        let timings = JobTimings(prefillMs: result.stats.prefillMilliseconds, decodeMs: result.stats.decodeMilliseconds,
                                 totalMs: result.stats.prefillMilliseconds + result.stats.decodeMilliseconds,
                                 generatedTokens: result.tokenIDs.count)
        return .succeeded(text: result.text, tokenIDs: result.tokenIDs, finishReason: result.finishReason.rawValue,
                          stats: result.stats, timings: timings)
    }

    /// The snapshot a job resumes from, or nil (logged) when its payload cannot be decoded or is
    /// not this request's state: the job then starts from scratch.
    func resumableSnapshot(_ payloads: [Data], for request: GenerationRequest, from path: String, log: (String) -> Void) -> GenerationSnapshot? {
        do {
            let snapshot = try GenerationSnapshot(frames: payloads)
            try pipeline.generator.checkSnapshot(snapshot, fits: request, request: 0)
            log("resuming from \(path) at decode step \(snapshot.decodeSteps) (\(snapshot.result.tokenIDs.count) tokens so far)")
            return snapshot
        } catch let error as SnapshotFormatError {
            log("\(path): \(error); starting the job from scratch")
        } catch GenerationError.snapshotMismatch(_, let reason) {
            log("\(path) does not fit its job: \(reason); starting the job from scratch")
        } catch {
            log("\(path): \(error); starting the job from scratch")
        }
        return nil
    }
}

struct Run: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Process queued jobs in batches until stopped (the daemon).",
        discussion: """
        Keeps up to --batch-size jobs generating together (continuous batching): at every decode \
        step boundary, jobs that finished leave the batch and the places they free are filled \
        with newly claimed jobs (their vision and prefill run together, in one pass), so the \
        batch never idles while its longest job finishes. Each job's result is what it would be \
        alone, whichever jobs share its steps. Leases are renewed from a heartbeat thread. Each \
        job gets one zstd-compressed result file per attempt, \
        OUT/<queue id>/<job id>-<attempt>.json.zst, written atomically, and is completed fenced \
        by its attempt. The queue id is the UUID `init` gave the \
        database (`dllava status` prints it), so queues sharing --out never collide. A job whose \
        image changed since it was enqueued (its sha256 differs) fails with a message naming the \
        file. Several `run` processes may share one database. With --lock-file a second run \
        holding the same lock exits 75 at once (for cron). --max-time and --max-jobs stop \
        claiming; the jobs already running finish.

        Each running job's KV cache and generation state go to OUT/<queue id>/snapshots/job-<id>.kv.zst, \
        an append-only file of checksummed frames: right after prefill a full frame with the prompt's \
        cells, then every --snapshot-every (a step count such as 32, or a duration such as 30s or \
        2m; default 30s) a frame with only the cells added since and the tokens and sampler state, \
        appended and fsynced. When writing snapshots takes more than 2% of the decode time the \
        interval is stretched (logged). A file that grows past twice the live state is rewritten as \
        one full frame (atomically). An interrupted job resumes from its latest good frame without \
        redoing vision and prefill, with exactly the output of an uninterrupted run; a torn or \
        damaged tail (a crash mid-append) is ignored. A snapshot with no intact first frame, of an \
        unknown version, of another model (by the contents of its files), or of another job, queue, \
        image, prompt or parameters is refused (logged) and the job starts from scratch. A job's \
        snapshot is deleted when it finishes; with --keep-kv its final snapshot stays there. \
        `dllava snapshot inspect FILE` lists a snapshot's frames.

        On a PostgreSQL queue results and snapshots are stored in the database, so \
        workers on any machine need only the connection string, and a job interrupted on one \
        machine resumes on another from its snapshot; --out is then optional and, when given, \
        each result is also written as OUT/<queue id>/<job id>-<attempt>.json.zst.

        SIGTERM or SIGINT: no new claims; at the next decode step every running job is \
        snapshotted, leaves its batch and is released to the queue; then exit 0. A job \
        cancelled while running (`dllava cancel`) leaves its batch at the next decode step; its \
        batch-mates go on. On a terminal, progress is one updating line on stderr (done/total, \
        tokens/s, ETA); otherwise one log line each time jobs enter the batch.

        Log lines go to stderr through swift-log: --log-level chooses the least severe level shown (debug adds \
        a line per finished job), and --log-format json writes one JSON object per line with time, level, \
        message, and job_id, custom_id and worker where they apply, for log shippers. The progress line on a \
        terminal is drawn below them either way.

        Metrics (Prometheus; the names are in docs/OPERATIONS.md): --metrics-file PATH rewrites a node_exporter \
        textfile atomically whenever jobs finish (at most every 10 s otherwise) and at exit, for cron runs; \
        --metrics-port N serves GET /metrics over HTTP on --metrics-host (127.0.0.1 unless given), for a daemon \
        under systemd. A metrics file that cannot be written at start, or a port that cannot be bound, exits 78 \
        before any job is claimed; a later failed write is logged and the run goes on. A --metrics-file that is \
        not a regular file (a device, FIFO, socket, folder, or a link to one) or that names the queue database or \
        its -wal, -shm or -journal file, and an --out that is not a folder, are refused with exit 64 before \
        anything is written.
        """)

    @OptionGroup var database: DatabaseOptions
    @OptionGroup var modelOptions: ModelOptions

    @Option(help: "Directory for result files (and, on an SQLite queue, snapshots); optional on a PostgreSQL queue, which stores both.")
    var out: String?

    @Flag(name: .customLong("until-empty"), help: "Exit when nothing is left to claim instead of polling.")
    var untilEmpty = false

    @Option(name: .customLong("max-time"), help: "Stop claiming after this long (e.g. 50m, 2h); running jobs finish.")
    var maxTime: String?

    @Option(name: .customLong("max-jobs"), help: "Stop after claiming this many jobs.")
    var maxJobs: Int?

    @Option(name: .customLong("batch-size"), help: "Jobs generating at once (freed places are refilled at every decode step).")
    var batchSize = 8

    @Option(name: .customLong("prefix-cache-mb"), help: ArgumentHelp(
        "Memory for the image-prefix cache in MiB: jobs about one image (same mode and keep rate) run the vision tower and the prompt's shared prefix once; 0 turns it off.",
        valueName: "MiB"))
    var prefixCacheMegabytes = GenerationBatch.defaultPrefixCacheBytes >> 20

    @Option(name: .customLong("lock-file"), help: "Hold this lock while running; exit 75 if another process holds it.")
    var lockFile: String?

    @Option(help: "Lease length (e.g. 5m), at least 2s; the heartbeat renews it every quarter.")
    var lease = "5m"

    @Option(name: .customLong("snapshot-every"), help: ArgumentHelp(
        "Add a frame to each running job's snapshot every N decode steps (32) or every duration (30s, 2m); 0: only on SIGTERM/SIGINT.",
        valueName: "steps|duration"))
    var snapshotEvery = "30s"

    @Flag(name: .customLong("keep-kv"), help: "Keep each finished job's final KV snapshot (in OUT/<queue id>/snapshots, or a PostgreSQL queue's database) instead of deleting it.")
    var keepKV = false

    @Option(name: .customLong("log-level"), help: "The least severe log level shown: trace, debug, info, notice, warning, error or critical.")
    var logLevel: Logger.Level = .info

    @Option(name: .customLong("log-format"), help: "plain (one sentence a line) or json (one object a line).")
    var logFormat: LogFormat = .plain

    @Option(name: .customLong("metrics-file"), help: ArgumentHelp("Write Prometheus metrics to this node_exporter textfile (name it *.prom).", valueName: "path"))
    var metricsFile: String?

    @Option(name: .customLong("metrics-port"), help: "Serve Prometheus metrics at http://HOST:PORT/metrics while running.")
    var metricsPort: Int?

    @Option(name: .customLong("metrics-host"), help: "The address --metrics-port listens on.")
    var metricsHost = "127.0.0.1"

    func validate() throws {
        guard out != nil || database.isPostgres else {
            throw ValidationError("--out is required on an SQLite queue (its results and snapshots are files there)")
        }
        guard batchSize >= 1 else { throw ValidationError("--batch-size must be at least 1") }
        guard (0...(1 << 30)).contains(prefixCacheMegabytes) else { throw ValidationError("--prefix-cache-mb must be 0 (off) or a number of MiB up to 2^30") }
        guard SnapshotInterval(snapshotEvery) != nil else {
            throw ValidationError("--snapshot-every: '\(snapshotEvery)' is neither a step count like 32 nor a duration like 30s or 2m")
        }
        if let maxJobs, maxJobs < 1 { throw ValidationError("--max-jobs must be at least 1") }
        if let metricsPort, !(0...65535).contains(metricsPort) { throw ValidationError("--metrics-port must be a port number, 0 to 65535") }
        guard let leaseMilliseconds = DurationText.milliseconds(lease) else {
            throw ValidationError("--lease: '\(lease)' is not a duration like 30s, 5m or 2h")
        }
        guard Int64(leaseMilliseconds) >= DaemonOptions.minimumLeaseMilliseconds else {
            throw ValidationError("--lease \(lease) is too short: a lease must be at least 2s (the heartbeat renews it every quarter, "
                                  + "and a shorter one expires under a healthy worker)")
        }
    }

    func run() throws {
        try runQueueCommand(self, database: database.path) {
            if let metricsFile { try checkOutputFile(metricsFile, option: "--metrics-file", database: database) }
            if let out { try checkOutputDirectory(out, option: "--out") }
            if let lockFile { try holdLock(lockFile) }
            var options = DaemonOptions()
            options.batchSize = batchSize
            options.untilEmpty = untilEmpty
            options.maxJobs = maxJobs
            options.maxSeconds = try maxTime.map { Double(try milliseconds($0, option: "--max-time")) / 1000 }
            options.leaseMilliseconds = try milliseconds(lease, option: "--lease")
            options.snapshotInterval = SnapshotInterval(snapshotEvery)!
            options.keepKV = keepKV
            let queue = try database.open()
            let display = ProgressDisplay()
            let logger = Logger(label: "dllava") { [logFormat, logLevel] _ in RunLogHandler(format: logFormat, level: logLevel, write: { display.write($0) }) }
            // Metrics first: a bad --metrics-file or a taken port is reported before a large model is loaded.
            let registry = metricsFile != nil || metricsPort != nil ? MetricsRegistry() : nil
            let metrics = registry.map { DaemonMetrics(factory: $0.factory) } ?? DaemonMetrics()
            let metricsWriter = try registry.flatMap { registry in try metricsFile.map { try startMetricsFile($0, registry: registry, logger: logger) } }
            let server = try registry.flatMap { registry in try metricsPort.map { try startMetricsServer($0, registry: registry, logger: logger) } }
            defer { server?.close() }
            let loadStart = DispatchTime.now()
            let pipeline = try LLaVAPipeline(model: try modelOptions.load())
            var workerLogger = logger
            workerLogger[metadataKey: "worker"] = .string(options.owner)
            workerLogger.info("loaded the model in \(String(format: "%.2f", Double(DispatchTime.now().uptimeNanoseconds - loadStart.uptimeNanoseconds) / 1e9)) s")
            let digests = FileDigestCache(location: FileDigestCache.defaultLocation())
            let runner = try EngineRunner(pipeline: pipeline, cache: digests, prefixCacheBytes: prefixCacheMegabytes << 20)
            do {
                try digests.save()
            } catch {
                logger.warning("cannot save the model file digests (the next start reads the model again): \(error)")
            }
            let daemon = try BatchDaemon(queue: queue, runner: runner, out: out.map { URL(fileURLWithPath: $0) }, options: options, metrics: metrics)
            let stop = StopFlag()
            let signals = [SIGTERM, SIGINT].map { number -> DispatchSourceSignal in
                signal(number, SIG_IGN)
                let source = DispatchSource.makeSignalSource(signal: number, queue: .global())
                source.setEventHandler {
                    logger.notice("signal \(number): snapshotting the running jobs at the next decode step, then stopping")
                    stop.stop()
                }
                source.resume()
                return source
            }
            do {
                let report = try daemon.run(stop: stop, logger: logger, progress: {
                    display.show($0)
                    metricsWriter?.update(done: $0.done)
                })
                metricsWriter?.finish()
                display.finish()
                signals.forEach { $0.cancel() }
                printSummary(report)
            } catch let stopped as DaemonStopped {
                metricsWriter?.finish()
                display.finish()
                signals.forEach { $0.cancel() }
                printSummary(stopped.report)
                let cause = queueCommandFailure(stopped.underlying, database: database.path)
                throw CommandFailure(message: "\(cause.message); stopped, and \(stopped.batchNote)", code: cause.code)
            }
        }
    }

    /// The metrics file's writer, after a first write that shows it can be written.
    func startMetricsFile(_ path: String, registry: MetricsRegistry, logger: Logger) throws -> MetricsFileWriter {
        let writer = MetricsFileWriter(registry: registry, url: URL(fileURLWithPath: path), failed: { logger.warning("\($0)") })
        do {
            try writer.write()
        } catch {
            throw CommandFailure(message: "--metrics-file: cannot write \(path): \(error)", code: 78)
        }
        return writer
    }

    func startMetricsServer(_ port: Int, registry: MetricsRegistry, logger: Logger) throws -> MetricsServer {
        do {
            let server = try MetricsServer(registry: registry, host: metricsHost, port: port)
            logger.notice("serving metrics at http://\(metricsHost):\(server.port)/metrics")
            return server
        } catch {
            throw CommandFailure(message: "--metrics-port: \(error)", code: 78)
        }
    }

    func printSummary(_ report: DaemonReport) {
        print("claimed \(report.claimed), succeeded \(report.succeeded), failed \(report.failed), retrying \(report.retried), "
              + "cancelled \(report.cancelled), released \(report.released), discarded \(report.discarded)")
    }

    func milliseconds(_ text: String, option: String) throws -> Int64 {
        guard let value = DurationText.milliseconds(text), value > 0 else {
            throw CommandFailure(message: "\(option): '\(text)' is not a duration like 30s, 5m or 2h", code: 64)
        }
        return Int64(value)
    }

    /// Takes an exclusive, non-blocking flock on `path` for the life of the process.
    func holdLock(_ path: String) throws {
        let descriptor = open(path, O_CREAT | O_RDWR, 0o644)
        guard descriptor >= 0 else { throw CommandFailure(message: "cannot open the lock file \(path): \(String(cString: strerror(errno)))", code: 78) }
        guard flock(descriptor, LOCK_EX | LOCK_NB) == 0 else {
            throw CommandFailure(message: "another dllava run holds \(path); exiting", code: 75)
        }
        // The descriptor stays open (and the lock held) until the process exits.
    }
}

extension Logger.Level: @retroactive ExpressibleByArgument {}
extension LogFormat: ExpressibleByArgument {}

/// Progress on stderr: on a terminal one line rewritten in place (done/total, tokens/s, ETA), with
/// log lines printed above it; otherwise the log lines alone.
final class ProgressDisplay: @unchecked Sendable {
    private let lock = NSLock()
    private let isTerminal = isatty(STDERR_FILENO) == 1
    private var lastShown = Date.distantPast
    private var lastDone = -1
    private var line = ""

    /// Writes one log line (formatted, without its newline) above the progress line.
    func write(_ text: String) {
        lock.withLock {
            if isTerminal && !line.isEmpty {
                writeRaw("\r\u{1B}[K\(text)\n\(line)")
            } else {
                writeRaw("\(text)\n")
            }
        }
    }

    func show(_ progress: DaemonProgress) {
        guard isTerminal else { return }
        lock.withLock {
            // A job finishing always shows; token counts at most ten times a second.
            guard progress.done != lastDone || Date().timeIntervalSince(lastShown) >= 0.1 else { return }
            lastShown = Date()
            lastDone = progress.done
            let eta = progress.etaSeconds.map { DurationText.describe(milliseconds: Int64($0 * 1000)) } ?? "?"
            line = "\(progress.done)/\(progress.done + progress.remaining) jobs, "
                + String(format: "%.1f", progress.tokensPerSecond) + " tokens/s, ETA \(eta)"
            writeRaw("\r\u{1B}[K" + line)
        }
    }

    /// Ends the progress line so what follows starts on its own.
    func finish() {
        lock.withLock {
            if isTerminal && !line.isEmpty { writeRaw("\n") }
            line = ""
        }
    }

    private func writeRaw(_ text: String) {
        FileHandle.standardError.write(Data(text.utf8))
    }
}
