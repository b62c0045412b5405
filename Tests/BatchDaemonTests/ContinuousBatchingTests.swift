// The daemon loop in process, on a real SQLite queue, with a fake engine and a manual clock (no
// sleeps): freed places are refilled at step boundaries (continuous batching), a cancel frees its
// place, a graceful stop snapshots and releases the running jobs and a new run resumes them,
// snapshots follow each job's own steps (a full frame after prefill, then appends; a torn tail cut
// off before the next append; compaction), the interval stretches when writing snapshots costs
// more than its budget, and --max-time stops claiming but lets running jobs end.
import Artifacts
import BatchDaemon
import Foundation
import JobQueue
import Testing

/// Time that moves only when told (the queue's clock, which the daemon reads too): the fake
/// engine advances it one second per decode step.
final class ManualClock: @unchecked Sendable {
    private let lock = NSLock()
    private var milliseconds: Int64 = 1_800_000_000_000

    var now: Int64 { lock.withLock { milliseconds } }
    func advance(_ delta: Int64) { lock.withLock { milliseconds += delta } }

    var queueClock: QueueClock { QueueClock(now: { self.now }) }
}

/// What the fake engine saw: the generating jobs of every decode step, the jobs of every
/// admission, and each job's token count and frame kind at every snapshot taken of it.
final class FakeWorld: @unchecked Sendable {
    var steps: [[Int64]] = []
    var admissions: [[Int64]] = []
    var snapshots: [Int64: [Int]] = [:]
    var frameKinds: [Int64: [SnapshotFrame.Kind]] = [:]
    /// Milliseconds the clock moves while a snapshot frame is taken (what writing it costs).
    var snapshotMilliseconds: Int64 = 0
    /// The live size each frame reports.
    var stateBytes = 1 << 20
    /// Called after each decode step with the number of steps so far.
    var afterStep: (Int) -> Void = { _ in }
    let clock: ManualClock

    init(clock: ManualClock) { self.clock = clock }
}

/// A fake engine. A job's prompt `tokens N` asks for N tokens; token k is k. Entering the batch
/// gives a job its first token (as prefill does), each decode step one more. A snapshot is the
/// tokens so far (every frame holds them all); a job resumed from one goes on after them. The
/// prompt `bad` is refused.
final class FakeBatch: RunningBatch {
    struct Stats: Codable, Sendable {
        /// Tokens the job had when it entered this batch (from its snapshot).
        var resumedWith: Int
    }

    let world: FakeWorld
    var order: [Int64] = []
    var tokens: [Int64: [Int32]] = [:]
    var wanted: [Int64: Int] = [:]
    var resumedWith: [Int64: Int] = [:]
    /// Jobs with a frame taken (or resumed from one): their next frame may be an append.
    var framed: Set<Int64> = []

    init(world: FakeWorld) { self.world = world }

    var generating: [Int64] { order.filter { tokens[$0]!.count < wanted[$0]! } }
    var finished: [Int64] { order.filter { tokens[$0]!.count >= wanted[$0]! } }

    func add(_ entries: [BatchEntry], log: (String) -> Void) -> [Int64: JobOutcome<Stats>] {
        var refused: [Int64: JobOutcome<Stats>] = [:]
        for entry in entries {
            let id = entry.job.id
            guard entry.job.prompt.hasPrefix("tokens "), let count = Int(entry.job.prompt.dropFirst(7)) else {
                refused[id] = .failed(reason: "cannot read the prompt '\(entry.job.prompt)'", permanent: true)
                continue
            }
            var sofar: [Int32] = []
            if let snapshot = entry.snapshot {
                sofar = try! JSONDecoder().decode([Int32].self, from: snapshot.last!)
                framed.insert(id)
                log("resuming from \(entry.snapshotLocation) with \(sofar.count) tokens")
            }
            resumedWith[id] = sofar.count
            tokens[id] = sofar.isEmpty ? [1] : sofar
            wanted[id] = count
            order.append(id)
        }
        world.admissions.append(entries.map(\.job.id).filter { refused[$0] == nil })
        return refused
    }

    func step() {
        let stepping = generating
        world.steps.append(stepping)
        for id in stepping { tokens[id]!.append(Int32(tokens[id]!.count + 1)) }
        world.clock.advance(1_000)
        world.afterStep(world.steps.count)
    }

    func snapshot(job: Int64, incremental: Bool) -> SnapshotFrame? {
        let kind: SnapshotFrame.Kind = incremental && framed.contains(job) ? .append : .full
        framed.insert(job)
        world.snapshots[job, default: []].append(tokens[job]!.count)
        world.frameKinds[job, default: []].append(kind)
        world.clock.advance(world.snapshotMilliseconds)
        return SnapshotFrame(kind: kind, decodeSteps: tokens[job]!.count - 1, cells: 1, payload: try! JSONEncoder().encode(tokens[job]!),
                             stateBytes: world.stateBytes)
    }

    func remove(job: Int64) -> JobOutcome<Stats>? {
        let done = tokens[job]!.count >= wanted[job]!
        let ids = tokens.removeValue(forKey: job)!
        order.removeAll { $0 == job }
        framed.remove(job)
        guard done else { return nil }
        return .succeeded(text: ids.map(String.init).joined(separator: " "), tokenIDs: ids, finishReason: "length",
                          stats: Stats(resumedWith: resumedWith[job]!), timings: JobTimings(generatedTokens: ids.count))
    }
}

struct FakeRunner: BatchRunner {
    let world: FakeWorld
    var fingerprint: ModelFingerprint { ModelFingerprint(fingerprint: "fake-model", name: "fake") }
    var snapshotLimits: SnapshotLimits { .absolute(maxBytes: 1 << 20) }
    func makeBatch() -> FakeBatch { FakeBatch(world: world) }
}

/// A queue in a fresh directory with one job per prompt (jobs 1, 2, ... in order), each with an
/// image file of its own.
struct Workspace {
    let directory: URL
    let clock = ManualClock()
    let queue: JobQueue

    init(prompts: [String]) throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("dllava-daemon-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        queue = try SQLiteJobQueue(path: directory.appendingPathComponent("q.sqlite").path, create: true, clock: clock.queueClock)
        var jobs: [NewJob] = []
        for (i, prompt) in prompts.enumerated() {
            let image = directory.appendingPathComponent("image\(i).png")
            let bytes = Data("image \(i)".utf8)
            try bytes.write(to: image)
            jobs.append(NewJob(customID: "job\(i + 1)", imagePath: image.path, imageSHA256: Checksum.sha256Hex(bytes), prompt: prompt))
        }
        _ = try queue.enqueue(jobs)
    }

    func daemon(_ world: FakeWorld, batchSize: Int, configure: (inout DaemonOptions) -> Void = { _ in }) throws -> BatchDaemon<FakeRunner> {
        var options = DaemonOptions()
        options.batchSize = batchSize
        options.untilEmpty = true
        options.snapshotInterval = .never
        let clock = clock
        options.stopwatch = { UInt64(clock.now) * 1_000_000 }
        configure(&options)
        return try BatchDaemon(queue: queue, runner: FakeRunner(world: world), out: directory.appendingPathComponent("out"), options: options)
    }

    /// Token ids of each succeeded job's result file, by job id.
    func results() throws -> [Int64: [Int32]] {
        struct Result: Decodable {
            let token_ids: [Int32]
        }
        var results: [Int64: [Int32]] = [:]
        for job in try queue.list(JobFilter(states: [.succeeded]), limit: 1_000) {
            let path = try #require(job.outputPath)
            results[job.id] = try ResultFile.read(Result.self, from: URL(fileURLWithPath: path)).token_ids
        }
        return results
    }

    func state(_ job: Int64) throws -> JobState? { try queue.job(id: job)?.state }
}

/// A log that collects lines from the daemon.
final class LogLines: @unchecked Sendable {
    private let lock = NSLock()
    private var lines: [String] = []
    func append(_ line: String) { lock.withLock { lines.append(line) } }
    var text: String { lock.withLock { lines.joined(separator: "\n") } }
}

@Suite("The daemon loop: continuous batching with a fake engine")
struct ContinuousBatchingTests {
    @Test("a place freed by a finished job is filled before the next decode step; the batch never exceeds its size; every job succeeds once")
    func freedPlacesAreRefilled() throws {
        let workspace = try Workspace(prompts: ["tokens 1", "tokens 4", "tokens 2", "tokens 1", "tokens 3"])
        defer { try? FileManager.default.removeItem(at: workspace.directory) }
        let world = FakeWorld(clock: workspace.clock)
        let report = try workspace.daemon(world, batchSize: 2).run(stop: StopFlag(), log: { _ in })
        // Job 1 ends at prefill, so job 3 joins job 2 before the first step; job 3 ends after
        // it, job 4 enters and ends at prefill, job 5 takes the place; job 2 never waits alone.
        #expect(world.admissions == [[1, 2], [3], [4], [5]])
        #expect(world.steps == [[2, 3], [2, 5], [2, 5]])
        #expect(report.claimed == 5 && report.succeeded == 5 && report.failed == 0 && report.discarded == 0)
        let results = try workspace.results()
        for (job, count) in [1, 4, 2, 1, 3].enumerated() {
            #expect(results[Int64(job + 1)] == (1...count).map { Int32($0) }, "job \(job + 1)")
        }
    }

    @Test("a job the engine refuses fails permanently and its place goes to the next job")
    func refusedJobsFreeTheirPlace() throws {
        let workspace = try Workspace(prompts: ["tokens 3", "bad", "tokens 2"])
        defer { try? FileManager.default.removeItem(at: workspace.directory) }
        let world = FakeWorld(clock: workspace.clock)
        let report = try workspace.daemon(world, batchSize: 2).run(stop: StopFlag(), log: { _ in })
        #expect(world.admissions == [[1], [3]])
        #expect(world.steps == [[1, 3], [1]])
        #expect(report.succeeded == 2 && report.failed == 1)
        #expect(try workspace.state(2) == .failed)
    }

    @Test("a job cancelled while it runs leaves at the next step boundary and the next job takes its place")
    func cancelFreesThePlace() throws {
        let workspace = try Workspace(prompts: ["tokens 5", "tokens 6", "tokens 3"])
        defer { try? FileManager.default.removeItem(at: workspace.directory) }
        let world = FakeWorld(clock: workspace.clock)
        let queue = workspace.queue
        world.afterStep = { step in
            if step == 2 { _ = try! queue.cancel(ids: [2]) }
        }
        let lines = LogLines()
        let report = try workspace.daemon(world, batchSize: 2).run(stop: StopFlag(), log: lines.append)
        #expect(world.steps == [[1, 2], [1, 2], [1, 3], [1, 3]])
        #expect(report.cancelled == 1 && report.succeeded == 2)
        #expect(try workspace.state(2) == .cancelled)
        #expect(lines.text.contains("job 2: cancelled at a decode step"), "\(lines.text)")
        #expect(try workspace.results()[1] == [1, 2, 3, 4, 5])
    }

    @Test("a stop snapshots and releases the running jobs and claims nothing more; the next run resumes them to the same tokens")
    func stopReleasesAndTheNextRunResumes() throws {
        let workspace = try Workspace(prompts: ["tokens 5", "tokens 6", "tokens 4"])
        defer { try? FileManager.default.removeItem(at: workspace.directory) }
        let world = FakeWorld(clock: workspace.clock)
        let stop = StopFlag()
        world.afterStep = { step in
            if step == 2 { stop.stop() }
        }
        let daemon = try workspace.daemon(world, batchSize: 2)
        let first = try daemon.run(stop: stop, log: { _ in })
        #expect(first.claimed == 2 && first.released == 2 && first.succeeded == 0)
        #expect(world.snapshots == [1: [3], 2: [3]])
        for job: Int64 in [1, 2] {
            #expect(try workspace.state(job) == .available)
            #expect(FileManager.default.fileExists(atPath: daemon.artifacts.snapshotLocation(job: job)), "job \(job)")
        }
        #expect(try workspace.state(3) == .available)

        let again = FakeWorld(clock: workspace.clock)
        let lines = LogLines()
        let second = try workspace.daemon(again, batchSize: 2).run(stop: StopFlag(), log: lines.append)
        #expect(second.succeeded == 3)
        #expect(lines.text.contains("resuming from \(daemon.artifacts.snapshotLocation(job: 1)) with 3 tokens"), "\(lines.text)")
        let results = try workspace.results()
        #expect(results[1] == [1, 2, 3, 4, 5] && results[2] == [1, 2, 3, 4, 5, 6] && results[3] == [1, 2, 3, 4])
        // Finished jobs' snapshots are removed.
        #expect(!FileManager.default.fileExists(atPath: daemon.artifacts.snapshotLocation(job: 1)))
    }

    @Test("snapshots follow each job's own decode steps; --max-time stops claiming and lets the running jobs finish")
    func snapshotsPerJobAndMaxTime() throws {
        let workspace = try Workspace(prompts: ["tokens 6", "tokens 3", "tokens 4", "tokens 4"])
        defer { try? FileManager.default.removeItem(at: workspace.directory) }
        let world = FakeWorld(clock: workspace.clock)
        let report = try workspace.daemon(world, batchSize: 2) {
            $0.snapshotInterval = .steps(2)
            $0.maxSeconds = 2.5
        }.run(stop: StopFlag(), log: { _ in })
        // Job 2 ends at step 2 (t = 2 s, no snapshot then: it finished); job 3 takes its place. Each
        // job's snapshot gets a full frame right after its prefill, then a frame after every second
        // step of its own. From t = 3 s the time is up: job 4 is never claimed, and jobs 1 and 3 run
        // to their end.
        #expect(world.steps == [[1, 2], [1, 2], [1, 3], [1, 3], [1, 3]])
        #expect(world.snapshots == [1: [1, 3, 5], 2: [1], 3: [1, 3]])
        #expect(world.frameKinds == [1: [.full, .append, .append], 2: [.full], 3: [.full, .append]])
        #expect(report.claimed == 3 && report.succeeded == 3)
        #expect(try workspace.state(4) == .available)
    }

    @Test("the heartbeat records each job's progress (1 for the prefill, 1 per decode step): a worker that stalls past its lease after progress costs the job no attempt, and it succeeds on its next claim")
    func heartbeatsRecordProgressSoADeathAfterProgressCostsNoAttempt() throws {
        let workspace = try Workspace(prompts: ["tokens 5"])
        defer { try? FileManager.default.removeItem(at: workspace.directory) }
        let world = FakeWorld(clock: workspace.clock)
        let queue = workspace.queue
        let seen = LogLines()
        world.afterStep = { step in
            guard step == 2 else { return }
            // One decode step has been counted (the second is under way): progress 2. The heartbeat beats every half
            // second of real time with a 2 s lease; wait for it to record that.
            let deadline = Date().addingTimeInterval(30)
            while (try? queue.job(id: 1))?.progress != 2 && Date() < deadline { Thread.sleep(forTimeInterval: 0.05) }
            // The worker now stalls past its lease (as if killed) and another worker's claim rescues the job.
            workspace.clock.advance(2_001)
            _ = try? queue.rescueExpiredLeases()
            let job = try? queue.job(id: 1)
            seen.append("\(job?.state.rawValue ?? "-") \(job?.maxAttempts ?? 0) \(job?.progress ?? 0) \(job?.error ?? "")")
        }
        let report = try workspace.daemon(world, batchSize: 1) { $0.leaseMilliseconds = 2_000 }.run(stop: StopFlag(), log: { _ in })
        #expect(seen.text.hasPrefix("retryable 4 2 the lease of "), "\(seen.text)")
        #expect(seen.text.hasSuffix(" expired during attempt 1 after progress (reached 0 to 2, saved 0 to 0): not counted against its attempts"), "\(seen.text)")
        let job = try #require(try queue.job(id: 1))
        #expect(job.state == .succeeded && job.attempt == 2 && job.maxAttempts == 4 && job.deathsWithoutProgress == 0, "\(job)")
        #expect(report.succeeded == 1)
    }

    @Test("--snapshot-every reads a step count or a duration; 0 is never; anything else is refused")
    func snapshotIntervals() {
        #expect(SnapshotInterval("32") == .steps(32) && SnapshotInterval("30s") == .milliseconds(30_000) && SnapshotInterval("2m") == .milliseconds(120_000))
        #expect(SnapshotInterval("0") == .never && SnapshotInterval("0s") == .never && SnapshotInterval("1m30s") == .milliseconds(90_000))
        for bad in ["", "-1", "30 s", "s", "1.5s", "ten"] { #expect(SnapshotInterval(bad) == nil, "\(bad)") }
        #expect(SnapshotInterval.steps(1).description == "1 step" && SnapshotInterval.milliseconds(90_000).description == "1m 30s")
    }

    @Test("frames are appended after the good ones: a stop appends, a torn tail is cut off before the next run appends, and the kept snapshot holds every frame")
    func framesAreAppendedAfterATornTail() throws {
        let workspace = try Workspace(prompts: ["tokens 8"])
        defer { try? FileManager.default.removeItem(at: workspace.directory) }
        let world = FakeWorld(clock: workspace.clock)
        let stop = StopFlag()
        world.afterStep = { step in
            if step == 3 { stop.stop() }
        }
        let daemon = try workspace.daemon(world, batchSize: 1) {
            $0.snapshotInterval = .steps(2)
            $0.keepKV = true
        }
        _ = try daemon.run(stop: stop, log: { _ in })
        #expect(world.snapshots == [1: [1, 3, 4]] && world.frameKinds == [1: [.full, .append, .append]])
        let url = URL(fileURLWithPath: daemon.artifacts.snapshotLocation(job: 1))
        let first = try Data(contentsOf: url)
        #expect(try SnapshotFile.read(from: url, limits: .absolute(maxBytes: 1 << 20), key: nil).frames.map(\.decodeSteps) == [0, 2, 3])
        // A crash in the middle of an append left half a frame.
        try (first + SnapshotFile.frame(SnapshotFrame(kind: .append, decodeSteps: 9, cells: 1, payload: Data(count: 100), stateBytes: 0),
                                        key: SnapshotKey(secret: Data(count: 32)), header: Data(count: 32), offset: first.count).prefix(90))
            .write(to: url)

        let again = FakeWorld(clock: workspace.clock)
        let lines = LogLines()
        let second = try workspace.daemon(again, batchSize: 1) {
            $0.snapshotInterval = .steps(2)
            $0.keepKV = true
        }.run(stop: StopFlag(), log: lines.append)
        let results = try workspace.results()
        #expect(second.succeeded == 1 && results[1] == (1...8).map { Int32($0) })
        #expect(lines.text.contains("job 1: \(url.path) is damaged from byte \(first.count) on, frame 4 "), "\(lines.text)")
        #expect(lines.text.contains("resuming from \(url.path) with 4 tokens"), "\(lines.text)")
        // Resumed from the stored frames: no new full frame; an append at step 2 of the second run, and the final one.
        #expect(again.frameKinds == [1: [.append, .append]] && again.snapshots == [1: [6, 8]])
        let kept = try Data(contentsOf: url)
        #expect(kept.prefix(first.count) == first, "the frames written before were rewritten")
        let contents = try SnapshotFile.read(from: url, limits: .absolute(maxBytes: 1 << 20), key: nil)
        #expect(contents.damage == nil && contents.frames.map(\.kind) == [.full, .append, .append, .append, .append])
        let finalTokens = try JSONEncoder().encode((1...8).map { Int32($0) })
        #expect(contents.payloads.last == finalTokens)
    }

    @Test("a snapshot that would grow past twice its live size is rewritten as one full frame, and a kept one past 1.25 times")
    func compaction() throws {
        let workspace = try Workspace(prompts: ["tokens 9"])
        defer { try? FileManager.default.removeItem(at: workspace.directory) }
        let world = FakeWorld(clock: workspace.clock)
        // A file of the identity header and one frame is about 270 bytes; each frame of the tokens adds about 90.
        world.stateBytes = 250
        let daemon = try workspace.daemon(world, batchSize: 1) {
            $0.snapshotInterval = .steps(1)
            $0.keepKV = true
        }
        _ = try daemon.run(stop: StopFlag(), log: { _ in })
        let kinds = try #require(world.frameKinds[1])
        // A frame after prefill, one after each step, the final one; a compaction asks for a full frame after its append.
        #expect(Set(try #require(world.snapshots[1])) == Set(1...9) && kinds[0] == .full)
        // Compactions (full frames) come between appends: the file never holds more than twice the live size.
        #expect(kinds.dropFirst().contains(.full) && kinds.dropFirst().contains(.append), "\(kinds)")
        let contents = try SnapshotFile.read(from: URL(fileURLWithPath: daemon.artifacts.snapshotLocation(job: 1)), limits: .absolute(maxBytes: 1 << 20), key: nil)
        #expect(contents.frames.count == 1 && contents.frames[0].kind == .full && contents.frames[0].decodeSteps == 8)
    }

    @Test("frames are held back (the interval stretches, logged) while one more would make writing snapshots take more than 2% of the decode time")
    func theIntervalFollowsTheCost() throws {
        let workspace = try Workspace(prompts: ["tokens 60"])
        defer { try? FileManager.default.removeItem(at: workspace.directory) }
        let world = FakeWorld(clock: workspace.clock)
        // A decode step takes 1 s; a frame 100 ms: every 2 s would be 5% of the decode time.
        world.snapshotMilliseconds = 100
        let lines = LogLines()
        let report = try workspace.daemon(world, batchSize: 1) { $0.snapshotInterval = .milliseconds(2_000) }.run(stop: StopFlag(), log: lines.append)
        #expect(report.succeeded == 1)
        #expect(lines.text.contains("of the decode time so far, more than the 2% budget: the snapshot interval (2s) is stretched until it is back within"),
                "\(lines.text)")
        let frames = try #require(world.snapshots[1]).count
        let decodeMilliseconds = 59 * 1_000
        // Within the budget, give or take the one frame that crosses it; yet frames keep coming.
        #expect(frames * 100 <= decodeMilliseconds * 2 / 100 + 100, "\(frames) frames")
        #expect(frames >= 5, "\(frames) frames")
        // Without the cost, the interval holds.
        let cheap = try Workspace(prompts: ["tokens 60"])
        defer { try? FileManager.default.removeItem(at: cheap.directory) }
        let free = FakeWorld(clock: cheap.clock)
        let quiet = LogLines()
        _ = try cheap.daemon(free, batchSize: 1) { $0.snapshotInterval = .milliseconds(2_000) }.run(stop: StopFlag(), log: quiet.append)
        #expect(try #require(free.snapshots[1]).count == 30 && !quiet.text.contains("stretched"))
    }
}
