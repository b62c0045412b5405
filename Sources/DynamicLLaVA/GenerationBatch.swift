// The step-driven generation loop, in the manner of llama.cpp's `llama_decode` loop: its owner
// adds requests (vision and prefill for all of them in one pass), steps the batch one token at a
// time, snapshots rows and removes them, all at step boundaries. Rows enter and leave while the
// others go on (continuous batching); a row's tokens never depend on which rows share its steps.
import Foundation
import Llama
import Numerics

/// A batch of generating rows over one KV cache.
///
/// ```swift
/// var batch = GenerationBatch(generator: generator)
/// let rows = try batch.add(requests)
/// while !batch.generating.isEmpty {
///     for row in batch.step() { results[row] = batch.remove(row) }   // finished this step
///     // ... add new requests into the freed places, snapshot or remove rows
/// }
/// ```
public struct GenerationBatch {
    /// A row of the batch: stable for as long as the row is in it, never reused by another.
    public struct Row: Hashable, Sendable, CustomStringConvertible {
        public let id: Int
        public var description: String { "row \(id)" }
    }

    public let generator: Generator
    var cache: KeyValueCache
    /// Rows in the batch (generating or finished and not yet removed), in the order they entered.
    var rows: [Row] = []
    var states: [Row: Generator.RequestState] = [:]
    /// Cache sequences whose rows were removed, reused by the next rows added.
    var freeSequences: [Int] = []
    /// `[layers][cells]` positions of each row's cells at its last snapshot frame (or as it resumed): what its next
    /// frame appends to. A row without an entry has had no frame.
    var framedPositions: [Row: [[Int32]]] = [:]
    var nextRow = 0
    /// Time the vision tower and projector took in the last `add` (over all its fresh rows' images), a part of
    /// those rows' `prefillMilliseconds`; for metrics.
    public private(set) var lastVisionMilliseconds = 0.0

    public init(generator: Generator) {
        self.generator = generator
        let c = generator.model.language.configuration
        cache = KeyValueCache(layers: c.hiddenLayers, sequences: 0, keyValueWidth: c.keyValueWidth,
                               storage: KeyValueCache.storage(for: Kernels.precision))
    }

    /// Rows still generating, in the order they entered.
    public var generating: [Row] { rows.filter { !states[$0]!.finished } }

    /// Rows that reached a stop rule and wait for `remove`.
    public var finished: [Row] { rows.filter { states[$0]!.finished } }

    /// Rows in the batch.
    public var count: Int { rows.count }

    /// Whether the row has reached a stop rule.
    public func isFinished(_ row: Row) -> Bool {
        guard let state = states[row] else { preconditionFailure("\(row) is not in the batch") }
        return state.finished
    }

    /// Adds requests as new rows, request `i` going on from `snapshots[i]` when given (no vision,
    /// no prefill: its cells, tokens and sampler are restored). The others run the vision tower
    /// together, over all their images at once, and are prefilled together in one packed pass;
    /// each then has its first token (and may already be finished, e.g. at `maxTokens` 1).
    /// Their `prefillMilliseconds` is the time of this whole call: their time to first token.
    ///
    /// Nothing is added when a request or snapshot does not fit (the error names its index).
    @discardableResult
    public mutating func add(_ requests: [GenerationRequest], resuming snapshots: [GenerationSnapshot?]? = nil) throws(GenerationError) -> [Row] {
        let snapshots = snapshots ?? Array(repeating: nil, count: requests.count)
        precondition(snapshots.count == requests.count, "one snapshot slot per request")
        try generator.validate(requests)
        for (r, snapshot) in snapshots.enumerated() {
            if let snapshot { try generator.checkSnapshot(snapshot, fits: requests[r], request: r) }
        }
        let start = DispatchTime.now()
        lastVisionMilliseconds = 0
        var added: [Row] = []
        var fresh: [(row: Row, request: GenerationRequest)] = []
        for (request, snapshot) in zip(requests, snapshots) {
            let row = Row(id: nextRow)
            nextRow += 1
            added.append(row)
            if let snapshot {
                let state = generator.resumedState(request, from: snapshot, sequence: takeSequence(), cache: &cache)
                cache.reserveCapacity(sequence: state.sequence, additionalCells: generator.cellsToCome(state))
                states[row] = state
                framedPositions[row] = snapshot.cells.map { Array($0.positions[...]) }
            } else {
                fresh.append((row, request))
            }
        }
        prefill(fresh, start: start)
        rows += added
        return added
    }

    /// Embeds, prefills and takes the first token of new rows.
    /// Sets `lastVisionMilliseconds` (0 when no row was fresh).
    mutating func prefill(_ fresh: [(row: Row, request: GenerationRequest)], start: DispatchTime) {
        guard !fresh.isEmpty else { return }
        let c = generator.model.language.configuration
        var prefilled: [Generator.RequestState] = []
        var flops: [Int] = []
        let visionStart = DispatchTime.now()
        let prompts = generator.promptEmbeddings(fresh.map(\.request))
        lastVisionMilliseconds = milliseconds(since: visionStart)
        for ((_, request), prompt) in zip(fresh, prompts) {
            var state = Generator.RequestState(request: request, sequence: -1, sampler: Sampler(request.parameters.sampling),
                                               promptEmbeddings: prompt.embeddings, promptLength: prompt.embeddings.rows,
                                               imageSpan: prompt.imageSpan)
            state.result.stats.promptTokens = prompt.embeddings.rows
            state.result.stats.precision = Kernels.precision
            state.result.stats.imageTokensTotal = prompt.imageSpan?.count ?? 0
            prefilled.append(state)
            flops.append(2 * c.hiddenSize * c.vocabularySize + (prompt.imageSpan == nil ? 0 : generator.visionFlops()))
        }
        var logits = [[Float]](repeating: [], count: fresh.count)
        // Rows with a KV cache: one packed pass. Rows without one recompute their sequence
        // (a replayed prefix is simply part of it).
        let cached = prefilled.indices.filter { prefilled[$0].sparsity.usesKeyValueCache }
        if !cached.isEmpty {
            var group = cached.map { i in
                var state = prefilled[i]
                state.sequence = takeSequence()
                state.forced = state.request.generatedPrefix
                return state
            }
            var groupFlops = cached.map { flops[$0] }
            let groupLogits = generator.prefill(&group, cache: &cache, flops: &groupFlops)
            for (j, i) in cached.enumerated() {
                prefilled[i] = group[j]
                flops[i] = groupFlops[j]
                logits[i] = groupLogits[j]
                prefilled[i].result.stats.kvCellsPerLayer = cache.cellCounts(sequence: group[j].sequence)
                cache.reserveCapacity(sequence: group[j].sequence, additionalCells: generator.cellsToCome(group[j]))
            }
        }
        for i in prefilled.indices where !prefilled[i].sparsity.usesKeyValueCache {
            prefilled[i].result.tokenIDs = prefilled[i].request.generatedPrefix
            logits[i] = generator.recompute(&prefilled[i], flops: &flops[i])
        }
        let elapsed = milliseconds(since: start)
        for (i, (row, _)) in fresh.enumerated() {
            var state = prefilled[i]
            state.result.stats.prefillMilliseconds = elapsed
            state.result.stats.prefillFlops = flops[i]
            generator.accept(logits[i], into: &state, cellsNow: state.result.stats.kvCellsPerLayer)
            states[row] = state
        }
    }

    /// One decode step: every generating row gets one token. Rows with a KV cache step together
    /// (each weight read once for all); rows without one recompute their sequence. Returns the
    /// rows that finished in this step; they stay in the batch until `remove`d.
    @discardableResult
    public mutating func step() -> [Row] {
        let active = generating
        guard !active.isEmpty else { return [] }
        let cached = active.filter { states[$0]!.sparsity.usesKeyValueCache }
        if !cached.isEmpty {
            let start = DispatchTime.now()
            let (logits, gates) = generator.decodeStep(cached.map { states[$0]! }, cache: &cache)
            let elapsed = milliseconds(since: start)
            for (i, row) in cached.enumerated() {
                var state = states[row]!
                state.decodeSteps += 1
                state.result.stats.decodeMilliseconds += elapsed
                if let gate = gates[i] { state.result.gateLogits.append(gate) }
                let cells = cache.cellCounts(sequence: state.sequence)
                state.result.stats.decodeFlops += generator.decodeStepFlops(cells: cells, gated: gates[i] != nil)
                state.result.stats.kvCellsPerLayer = cells
                generator.accept(logits.row(i), into: &state, cellsNow: cells)
                states[row] = state
            }
        }
        for row in active where !states[row]!.sparsity.usesKeyValueCache {
            var state = states[row]!
            let start = DispatchTime.now()
            var flops = 0
            let logits = generator.recompute(&state, flops: &flops)
            state.decodeSteps += 1
            state.result.stats.decodeMilliseconds += milliseconds(since: start)
            state.result.stats.decodeFlops += flops
            generator.accept(logits, into: &state, cellsNow: state.result.stats.kvCellsPerLayer)
            states[row] = state
        }
        return active.filter { states[$0]!.finished }
    }

    /// The row's state as a snapshot, generating or finished; nil for a row without a KV cache
    /// (its sequence is recomputed anyway).
    public func snapshot(_ row: Row) -> GenerationSnapshot? {
        guard let state = states[row] else { preconditionFailure("\(row) is not in the batch") }
        guard state.sparsity.usesKeyValueCache else { return nil }
        return generator.snapshot(of: state, cache: cache)
    }

    /// A snapshot frame of the row's state, generating or finished; nil for a row without a KV cache. With
    /// `incremental` (the row's previous frame is stored), the frame holds only the cells added since that frame;
    /// it is full when the row has had no frame, or when a layer's cells no longer begin with those the previous
    /// frame left (a row's cells only grow between steps, so this is a safeguard: a full frame is always right).
    public mutating func snapshotFrame(_ row: Row, incremental: Bool) -> GenerationSnapshot.Frame? {
        guard let snapshot = snapshot(row) else { return nil }
        var base: [Int]?
        if incremental, let framed = framedPositions[row], framed.count == snapshot.cells.count,
           zip(framed, snapshot.cells).allSatisfy({ $1.cellCount >= $0.count && $1.positions[..<$0.count].elementsEqual($0) }) {
            base = framed.map(\.count)
        }
        framedPositions[row] = snapshot.cells.map { Array($0.positions[...]) }
        return snapshot.frame(after: base)
    }

    /// Takes the row out of the batch, finished or not, and frees its cells; returns its result
    /// (partial for a row that had not finished). The other rows go on unchanged.
    @discardableResult
    public mutating func remove(_ row: Row) -> GenerationResult {
        guard let state = states.removeValue(forKey: row) else { preconditionFailure("\(row) is not in the batch") }
        rows.removeAll { $0 == row }
        framedPositions[row] = nil
        if state.sparsity.usesKeyValueCache {
            cache.clear(sequence: state.sequence)
            freeSequences.append(state.sequence)
        }
        return state.result
    }

    /// A free cache sequence: one a removed row left, or a new one.
    mutating func takeSequence() -> Int {
        if let sequence = freeSequences.popLast() { return sequence }
        return cache.appendSequence()
    }
}
