// KV snapshots and the step-driven batch in the engine: the payload round trip, resuming exactly
// where a batch stopped (greedy and seeded sampling, full and dynamic modes, rows of different
// lengths), incremental frames (a full frame after prefill, then appends) that make the same state
// and resume to the uninterrupted run from every frame, a snapshot file torn or damaged anywhere,
// rows leaving and entering a running batch while their batch-mates go on unchanged, and payloads
// that must be refused.
import Artifacts
import Foundation
import Testing
@testable import DynamicLLaVA
@testable import Llama

/// Generous bounds for the tests that are not about them.
let testLimits = SnapshotLimits.absolute(maxBytes: 1 << 30)
/// The queue secret the tests' snapshots are tagged with.
let testKey = SnapshotKey(secret: Data(repeating: 7, count: 32))

/// A model and a sparsity mode to resume in.
struct ResumeCase: Sendable, CustomTestStringConvertible {
    let model: String
    let mode: SparsityMode
    let sampling: SamplingParameters

    var testDescription: String { "\(model) \(mode) \(sampling.isGreedy ? "greedy" : "seeded sampling")" }

    static let all: [ResumeCase] = [
        ResumeCase(model: "llava_hf_tiny", mode: .full, sampling: SamplingParameters()),
        ResumeCase(model: "llava_hf_tiny", mode: .full, sampling: SamplingParameters(temperature: 1.3, topK: 40, topP: 0.9, seed: 5)),
        ResumeCase(model: "dynamic_llava_tiny", mode: .dynamic, sampling: SamplingParameters()),
        ResumeCase(model: "dynamic_llava_tiny", mode: .dynamic, sampling: SamplingParameters(temperature: 1.3, topK: 40, topP: 0.9, seed: 5)),
    ]

    func generator() throws -> Generator {
        Generator(model: try Fixture.model(model), detokenize: { $0.map { "<\($0)>" }.joined() })
    }

    /// Three rows of different prompts and lengths.
    func requests() throws -> [GenerationRequest] {
        let cases = try Fixture.cases()
        return [(cases[0], 14), (cases[1], 9), (cases[0], 17)].enumerated().map { r, item in
            var request = Fixture.request(item.0, maxTokens: item.1, logprobs: 2)
            request.parameters.sparsity = SparsityParameters(mode: mode)
            request.parameters.sampling = sampling
            request.parameters.sampling.seed += UInt64(r)
            return request
        }
    }
}

/// Runs `requests` (resuming from `snapshots`) in one batch for `step` decode steps, taking out
/// the rows that finish, then snapshots every generating row and removes it; returns the
/// snapshots (through their bytes) and the finished rows' results.
func interrupt(_ generator: Generator, _ requests: [GenerationRequest], resuming snapshots: [GenerationSnapshot?],
               atStep step: Int) throws -> (snapshots: [GenerationSnapshot?], results: [GenerationResult?]) {
    var batch = GenerationBatch(generator: generator)
    let rows = try batch.add(requests, resuming: snapshots)
    var results = [GenerationResult?](repeating: nil, count: requests.count)
    var captured = [GenerationSnapshot?](repeating: nil, count: requests.count)
    func takeFinished() {
        for row in batch.finished { results[rows.firstIndex(of: row)!] = batch.remove(row) }
    }
    takeFinished()
    for _ in 0..<step where !batch.generating.isEmpty {
        batch.step()
        takeFinished()
    }
    for row in batch.generating {
        captured[rows.firstIndex(of: row)!] = try GenerationSnapshot(frames: [try #require(batch.snapshot(row)).frame().payload])
        batch.remove(row)
    }
    #expect(batch.count == 0)
    return (captured, results)
}

/// Runs `requests` (resuming from `snapshots`) in one batch until every row has finished.
func runToEnd(_ generator: Generator, _ requests: [GenerationRequest], resuming snapshots: [GenerationSnapshot?]) throws -> [GenerationResult] {
    var batch = GenerationBatch(generator: generator)
    let rows = try batch.add(requests, resuming: snapshots)
    while !batch.generating.isEmpty { batch.step() }
    return rows.map { batch.remove($0) }
}

/// `layer`'s cells as a bf16 cache holds them.
func bf16(_ layer: SequenceCells, width: Int) -> SequenceCells {
    var cells = SequenceCells(storage: .bfloat16)
    let (keys, values) = layer.floatKeysAndValues
    cells.append(positions: layer.positions[...], keys: keys[...], values: values[...])
    return cells
}

/// `value` rounded to bf16 (to nearest even) and widened back.
func bf16Rounded(_ value: Float) -> Float {
    let bits = value.bitPattern
    return Float(bitPattern: (bits &+ 0x7FFF &+ ((bits >> 16) & 1)) & 0xFFFF_0000)
}

@Suite("KV snapshots")
struct SnapshotTests {
    @Test("a snapshot survives encoding and decoding unchanged")
    func roundTrip() throws {
        let resume = ResumeCase.all[3]
        let (snapshots, _) = try interrupt(try resume.generator(), try resume.requests(), resuming: [nil, nil, nil], atStep: 4)
        for snapshot in snapshots {
            let snapshot = try #require(snapshot)
            #expect(try GenerationSnapshot(frames: [snapshot.frame().payload]) == snapshot)
            #expect(snapshot.decodeSteps == 4 && snapshot.result.tokenIDs.count == 5 && !snapshot.finished)
            #expect(snapshot.sampler.generator != Sampler(snapshot.parameters.sampling).generator || snapshot.parameters.sampling.isGreedy)
        }
        // Dynamic: fewer cells above the sparse layer, each with its original position.
        let cells = try #require(snapshots[0]).cells
        #expect(cells[3].cellCount < cells[0].cellCount)
        #expect(cells[3].positions == cells[3].positions.sorted() && cells[3].positions.last! > Int32(cells[3].cellCount))
    }

    @Test("resuming from snapshots, twice, gives exactly the uninterrupted run", arguments: ResumeCase.all)
    func resumeEqualsUninterrupted(_ resume: ResumeCase) throws {
        let generator = try resume.generator()
        let requests = try resume.requests()
        let whole = try generator.generate(requests)

        let first = try interrupt(generator, requests, resuming: [nil, nil, nil], atStep: 3)
        #expect(first.results.allSatisfy { $0 == nil })
        // Vision is not run again: the resumed rows are given other pixels and must not notice.
        var blind = requests
        for r in blind.indices { blind[r].pixelValues = Array(repeating: 0.5, count: requests[r].pixelValues!.count) }
        let second = try interrupt(generator, blind, resuming: first.snapshots, atStep: 6)
        // The 9-token row finished at step 5 of the second run (3 + 5 = 8 steps): it has its result.
        #expect(second.results[1] != nil && second.snapshots[1] == nil)
        let rest = try runToEnd(generator, blind, resuming: second.snapshots)

        for r in requests.indices {
            let resumed = try #require(second.results[r] ?? rest[r])
            #expect(resumed.tokenIDs == whole[r].tokenIDs, "row \(r)")
            #expect(resumed.text == whole[r].text, "row \(r)")
            #expect(resumed.finishReason == whole[r].finishReason)
            #expect(resumed.logprobs == whole[r].logprobs, "row \(r)")
            #expect(resumed.keptImageIndices == whole[r].keptImageIndices)
            #expect(resumed.stats.kvCellsPerLayer == whole[r].stats.kvCellsPerLayer)
            #expect(resumed.stats.kvBytesPeak == whole[r].stats.kvBytesPeak)
            #expect(resumed.stats.prefillFlops == whole[r].stats.prefillFlops)
        }
    }

    /// Runs `requests` in one batch to the end, taking an incremental frame of every generating row right after
    /// prefill and after each step in `frameSteps`; returns each row's frames and its state at each frame.
    func framesOfARun(_ generator: Generator, _ requests: [GenerationRequest], frameSteps: Set<Int>)
        throws -> (frames: [[GenerationSnapshot.Frame]], states: [[GenerationSnapshot]]) {
        var batch = GenerationBatch(generator: generator)
        let rows = try batch.add(requests)
        var frames = [[GenerationSnapshot.Frame]](repeating: [], count: rows.count)
        var states = [[GenerationSnapshot]](repeating: [], count: rows.count)
        func takeFrames() throws {
            for row in batch.generating {
                let r = rows.firstIndex(of: row)!
                let frame = batch.snapshotFrame(row, incremental: true)
                frames[r].append(try #require(frame))
                states[r].append(try #require(batch.snapshot(row)))
            }
        }
        try takeFrames()
        var step = 0
        while !batch.generating.isEmpty {
            batch.step()
            step += 1
            if frameSteps.contains(step) { try takeFrames() }
        }
        return (frames, states)
    }

    @Test("incremental frames: a full frame after prefill, then only the new cells; every prefix of them makes the state it was taken at and resumes to the uninterrupted run",
          arguments: [ResumeCase.all[1], ResumeCase.all[3]])
    func incrementalFramesResumeExactly(_ resume: ResumeCase) throws {
        let generator = try resume.generator()
        let requests = try resume.requests()
        let whole = try generator.generate(requests)
        let (frames, states) = try framesOfARun(generator, requests, frameSteps: [2, 3, 7])
        for r in requests.indices {
            #expect(frames[r].first?.isFull == true && frames[r].dropFirst().allSatisfy { !$0.isFull }, "row \(r)")
            #expect(frames[r].count >= 3, "row \(r)")
            for k in frames[r].indices {
                let state = try GenerationSnapshot(frames: frames[r][...k].map(\.payload))
                #expect(state == states[r][k], "row \(r), frame \(k)")
                let cells = states[r][k].cells.reduce(0) { $0 + $1.cellCount }
                let before = k == 0 ? 0 : states[r][k - 1].cells.reduce(0) { $0 + $1.cellCount }
                #expect(frames[r][k].cells == cells - before && frames[r][k].stateBytes == states[r][k].frame().payload.count, "row \(r), frame \(k)")
                if k > 0 { #expect(frames[r][k].payload.count < frames[r][0].payload.count / 2, "an append frame holds the new cells only") }
                // Vision is not run again: the resumed row is given other pixels and must not notice.
                var blind = requests[r]
                blind.pixelValues = Array(repeating: 0.5, count: requests[r].pixelValues!.count)
                let resumed = try runToEnd(generator, [blind], resuming: [state])[0]
                #expect(resumed.tokenIDs == whole[r].tokenIDs && resumed.logprobs == whole[r].logprobs, "row \(r), from frame \(k)")
                #expect(resumed.stats.kvCellsPerLayer == whole[r].stats.kvCellsPerLayer, "row \(r), from frame \(k)")
            }
        }
    }

    @Test("a snapshot file of real frames cut at every frame boundary and inside every frame, or with a byte flipped in a frame, gives the state of the last intact frame, which resumes to the uninterrupted run")
    func tornSnapshotFilesResumeFromTheLastIntactFrame() throws {
        let resume = ResumeCase.all[3]
        let generator = try resume.generator()
        let requests = try resume.requests()
        let whole = try generator.generate(requests)
        let (frames, states) = try framesOfARun(generator, requests, frameSteps: [2, 5])
        let identity = SnapshotIdentity(model: "m", queue: "q", job: 1, imageSHA256: "i", prompt: "p", parameters: "{}")
        let r = 0
        for encoding in SnapshotEncoding.allCases {
            let file = try SnapshotFile.encode(frames[r].map {
                SnapshotFrame(kind: $0.isFull ? .full : .append, decodeSteps: $0.decodeSteps, cells: $0.cells, payload: $0.payload, stateBytes: $0.stateBytes)
            }, identity: identity, encoding: encoding, key: testKey)
            let records = try SnapshotFile.decode(file, path: "f", limits: testLimits, key: testKey).frames
            #expect(records.count == frames[r].count)
            var cases: [(Data, Int, String)] = []
            for (k, record) in records.enumerated() {
                let end = record.offset + record.fileBytes
                cases.append((file.prefix(end), k, "cut after frame \(k + 1)"))
                for inside in [3, SnapshotFile.frameHeaderSize + 1, SnapshotFile.frameHeaderSize + record.storedBytes / 2, record.fileBytes - 1] {
                    cases.append((file.prefix(record.offset + inside), k - 1, "cut at byte \(inside) of frame \(k + 1)"))
                }
                for position in [6, 30, SnapshotFile.frameHeaderSize + record.storedBytes / 4, record.fileBytes - 2] {
                    var damaged = file
                    damaged[record.offset + position] ^= 0x01
                    cases.append((damaged, k - 1, "byte \(position) of frame \(k + 1) flipped"))
                }
            }
            for (bytes, last, name) in cases {
                guard last >= 0 else {
                    #expect(throws: SnapshotFileError.self, "\(encoding), \(name)") { try SnapshotFile.decode(bytes, path: "f", limits: testLimits, key: testKey) }
                    continue
                }
                let state = try GenerationSnapshot(frames: try SnapshotFile.decode(bytes, path: "f", limits: testLimits, key: testKey).payloads)
                #expect(state == states[r][last], "\(encoding), \(name)")
            }
        }
        // Each state a torn file can give resumes exactly.
        for state in states[r] {
            let resumed = try runToEnd(generator, [requests[r]], resuming: [state])[0]
            #expect(resumed.tokenIDs == whole[r].tokenIDs && resumed.logprobs == whole[r].logprobs)
        }
    }

    @Test("a row removed at a decode step leaves its batch-mates unchanged, and a row added into its place gets what it gets alone")
    func rowsLeaveAndEnterARunningBatch() throws {
        let resume = ResumeCase.all[2]
        let generator = try resume.generator()
        let requests = try resume.requests()
        let whole = try generator.generate(requests)
        var late = requests[1]
        late.parameters.sampling = SamplingParameters(temperature: 1.1, topK: 20, seed: 9)
        late.parameters.maxTokens = 12
        let alone = try generator.generate([late])[0]

        var batch = GenerationBatch(generator: generator)
        let rows = try batch.add(requests)
        #expect(batch.generating == rows && batch.finished.isEmpty)
        batch.step()
        batch.step()
        let partial = batch.remove(rows[0])
        #expect(partial.tokenIDs == Array(whole[0].tokenIDs.prefix(3)), "a removed row's tokens so far")
        #expect(batch.generating == [rows[1], rows[2]])
        // The newcomer takes the removed row's place in the cache while the others are mid-way.
        let added = try batch.add([late])
        #expect(batch.count == 3 && !rows.contains(added[0]))
        var results: [GenerationBatch.Row: GenerationResult] = [:]
        while !batch.generating.isEmpty {
            for row in batch.step() { results[row] = batch.remove(row) }
        }
        for r in [1, 2] {
            #expect(results[rows[r]]?.tokenIDs == whole[r].tokenIDs && results[rows[r]]?.text == whole[r].text, "row \(r)")
            #expect(results[rows[r]]?.logprobs == whole[r].logprobs, "row \(r)")
        }
        #expect(results[added[0]]?.tokenIDs == alone.tokenIDs && results[added[0]]?.logprobs == alone.logprobs)
        #expect(results[added[0]]?.keptImageIndices == alone.keptImageIndices)
        #expect(results[added[0]]?.stats.kvCellsPerLayer == alone.stats.kvCellsPerLayer)
        #expect(batch.count == 0)
    }

    @Test("bf16 K/V: cells are rounded once when appended, hold half the bytes, compact as f32 cells do, and frames keep them bit for bit")
    func bf16Cells() throws {
        let resume = ResumeCase.all[2]
        let (snapshots, _) = try interrupt(try resume.generator(), try resume.requests(), resuming: [nil, nil, nil], atStep: 2)
        var snapshot = try #require(snapshots[0])
        let width = snapshot.keyValueWidth
        let f32Cells = snapshot.cells
        snapshot.cells = f32Cells.map { bf16($0, width: width) }
        for (layer, rounded) in zip(f32Cells, snapshot.cells) {
            #expect(rounded.storage == .bfloat16 && rounded.positions == layer.positions && rounded.keys.count * 2 == layer.keys.count)
            let exact = layer.floatKeysAndValues, stored = rounded.floatKeysAndValues
            // Round to nearest: within half a unit in the last of bf16's 8 significant bits.
            for (a, b) in zip(stored.keys + stored.values, exact.keys + exact.values) { #expect(abs(a - b) <= abs(b) * 0x1p-8) }
        }
        #expect(try GenerationSnapshot(frames: [snapshot.frame().payload]) == snapshot)
        var f32Snapshot = snapshot
        f32Snapshot.cells = f32Cells
        #expect(snapshot.frame().payload.count < f32Snapshot.frame().payload.count)
        // An append frame carries bf16 cells too, and a frame of another storage type does not append.
        var shorter = snapshot
        shorter.cells = snapshot.cells.map { layer in
            let keep = layer.cellCount - 1, rowBytes = layer.keys.count / max(layer.cellCount, 1)
            return SequenceCells(storage: .bfloat16, positions: Array(layer.positions.prefix(keep)), keys: Array(layer.keys.prefix(keep * rowBytes)),
                                 values: Array(layer.values.prefix(keep * rowBytes)))
        }
        let append = snapshot.frame(after: shorter.cells.map(\.cellCount)).payload
        #expect(try GenerationSnapshot(frames: [shorter.frame().payload, append]) == snapshot)
        #expect(throws: SnapshotFormatError.self) { try GenerationSnapshot(frames: [f32Snapshot.frame().payload, append]) }

        // Compaction drops the cells of tokens that write no K/V and keeps the others' bytes.
        var cells = SequenceCells(storage: .bfloat16)
        let keys = (0..<3 * width).map { Float($0) }, values = keys.map { -$0 }
        cells.append(positions: [4, 5, 6], keys: keys[...], values: values[...])
        cells.compactNewest(writes: [true, false, true], width: width)
        #expect(cells.positions == [4, 6])
        #expect(cells.floatKeysAndValues.keys == (Array(keys[0..<width]) + Array(keys[2 * width ..< 3 * width])).map { bf16Rounded($0) })
        #expect(cells.floatKeysAndValues.values == (Array(values[0..<width]) + Array(values[2 * width ..< 3 * width])).map { bf16Rounded($0) })
    }

    @Test("a payload of an unknown version or storage type, or cut short, is refused")
    func badPayloadsAreRefused() throws {
        let resume = ResumeCase.all[0]
        let (snapshots, _) = try interrupt(try resume.generator(), try resume.requests(), resuming: [nil, nil, nil], atStep: 1)
        let snapshot = try #require(snapshots[0])
        let payload = snapshot.frame().payload
        var newer = payload
        newer[0] = 3
        #expect(throws: SnapshotFormatError.unsupportedVersion(found: 3, supported: 2)) { try GenerationSnapshot(frames: [newer]) }
        var older = payload
        older[0] = 1
        #expect(throws: SnapshotFormatError.unsupportedVersion(found: 1, supported: 2)) { try GenerationSnapshot(frames: [older]) }
        var unknownStorage = payload
        unknownStorage[4] = 3
        #expect(throws: SnapshotFormatError.unsupportedStorageType(3)) { try GenerationSnapshot(frames: [unknownStorage]) }
        for length in [0, 3, 40, payload.count / 2, payload.count - 1] {
            #expect(throws: SnapshotFormatError.self) { try GenerationSnapshot(frames: [payload.prefix(length)]) }
        }
        #expect(throws: SnapshotFormatError.malformed("1 bytes follow the last layer of frame 1")) { try GenerationSnapshot(frames: [payload + Data([0])]) }
        #expect(throws: SnapshotFormatError.malformed("there is no frame")) { try GenerationSnapshot(frames: []) }
        // An append frame must append to the cells the frames before it hold.
        let append = snapshot.frame(after: snapshot.cells.map { $0.cellCount - 1 }).payload
        #expect(throws: SnapshotFormatError.self) { try GenerationSnapshot(frames: [append]) }
        #expect(throws: SnapshotFormatError.self) { try GenerationSnapshot(frames: [payload, append]) }
    }

    @Test("a snapshot of another prompt, other parameters, another precision or another model does not fit")
    func mismatchedSnapshotsDoNotFit() throws {
        let resume = ResumeCase.all[0]
        let generator = try resume.generator()
        let requests = try resume.requests()
        let (snapshots, _) = try interrupt(generator, requests, resuming: [nil, nil, nil], atStep: 1)
        let snapshot = try #require(snapshots[0])
        try generator.checkSnapshot(snapshot, fits: requests[0], request: 0)
        #expect(throws: GenerationError.snapshotMismatch(request: 1, reason: "its prompt differs")) {
            try generator.checkSnapshot(snapshot, fits: requests[1], request: 1)
        }
        var otherSeed = requests[0]
        otherSeed.parameters.sampling.seed += 1
        #expect(throws: GenerationError.snapshotMismatch(request: 0, reason: "its generation parameters differ")) {
            try generator.checkSnapshot(snapshot, fits: otherSeed, request: 0)
        }
        // Another precision would not continue the run bit for bit (the tests run at f32).
        var otherPrecision = snapshot
        otherPrecision.result.stats.precision = .bf16
        #expect(throws: GenerationError.snapshotMismatch(request: 0, reason: "it was computed at bf16 precision, this run uses f32")) {
            try generator.checkSnapshot(otherPrecision, fits: requests[0], request: 0)
        }
        var bf16Cells = snapshot
        bf16Cells.cells = snapshot.cells.map { layer in bf16(layer, width: snapshot.keyValueWidth) }
        #expect(throws: GenerationError.snapshotMismatch(request: 0, reason: "its K/V are stored as BF16, this run keeps F32")) {
            try generator.checkSnapshot(bf16Cells, fits: requests[0], request: 0)
        }
        let otherModel = Generator(model: try DynamicFixture.model())
        #expect(throws: GenerationError.self) { try otherModel.checkSnapshot(snapshot, fits: requests[0], request: 0) }
        // A batch checks too, before any work, and adds nothing.
        var batch = GenerationBatch(generator: generator)
        #expect(throws: GenerationError.snapshotMismatch(request: 1, reason: "its prompt differs")) {
            try batch.add([requests[0], requests[1]], resuming: [nil, snapshot])
        }
        #expect(batch.count == 0)
    }
}
