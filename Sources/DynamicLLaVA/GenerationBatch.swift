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
    /// Image prefixes shared by the rows asking about one image, kept across `add` calls.
    var prefixCache: PrefixCache
    /// Time the vision tower and projector took in the last `add` (over all its fresh rows' images, less weight
    /// packing), a part of those rows' `prefillMilliseconds`; for metrics.
    public private(set) var lastVisionMilliseconds = 0.0

    /// The image-prefix cache's default bound: room for the prefixes of a few images of a 7B model.
    public static let defaultPrefixCacheBytes = 512 << 20

    /// - Parameter prefixCacheBytes: bytes the image-prefix cache may hold (`PrefixCache`); 0 turns it off, so
    ///   that every row is prefilled whole.
    public init(generator: Generator, prefixCacheBytes: Int = defaultPrefixCacheBytes) {
        self.generator = generator
        prefixCache = PrefixCache(capacityBytes: prefixCacheBytes)
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

    /// Whether the row took its image prefix's cells from the prefix cache (computed for an earlier row).
    public func usedCachedPrefix(_ row: Row) -> Bool {
        guard let state = states[row] else { preconditionFailure("\(row) is not in the batch") }
        return state.result.stats.cachedPrefixTokens != nil
    }

    /// Whether the row has reached a stop rule.
    public func isFinished(_ row: Row) -> Bool {
        guard let state = states[row] else { preconditionFailure("\(row) is not in the batch") }
        return state.finished
    }

    /// Adds requests as new rows, request `i` going on from `snapshots[i]` when given (no vision,
    /// no prefill: its cells, tokens and sampler are restored). The others run the vision tower
    /// together, over all their images at once, and are prefilled together in one packed pass;
    /// each then has its first token (and may already be finished, e.g. at `maxTokens` 1).
    /// Their `prefillMilliseconds` is the time of this whole call, their time to first token, less the time spent
    /// packing weights on their first use (`packingMilliseconds`).
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

    /// Embeds, prefills and takes the first token of new rows. Rows whose image prefix is shared
    /// (`Generator.prefixKey`) take its cells from the prefix cache and prefill only their own
    /// tokens on top; the first row of a prefix not held is prefilled whole, and the prefix's cells
    /// are cut from its own (a token's cells never depend on the tokens after it).
    /// Sets `lastVisionMilliseconds` (0 when no row was fresh).
    mutating func prefill(_ fresh: [(row: Row, request: GenerationRequest)], start: DispatchTime) {
        guard !fresh.isEmpty else { return }
        let packingBefore = WeightPacking.milliseconds
        let c = generator.model.language.configuration, patches = generator.model.vision.configuration.patchCount
        let requests = fresh.map(\.request)
        let keys = requests.map { prefixCache.isEnabled ? generator.prefixKey($0) : nil }
        // The shared prefixes this call needs: those held, and those its first row computes whole.
        var prefixes: [PrefixCache.Key: PrefixCache.Entry] = [:]
        var toCompute: [(key: PrefixCache.Key, row: Int)] = []
        var pending = Set<PrefixCache.Key>()
        for (i, key) in keys.enumerated() {
            guard let key, prefixes[key] == nil, !pending.contains(key) else { continue }
            if let entry = prefixCache.entry(key) {
                prefixes[key] = entry
            } else {
                pending.insert(key)
                toCompute.append((key, i))
            }
        }
        let computing = Set(toCompute.map(\.row))
        let whole = requests.indices.filter { keys[$0] == nil || computing.contains($0) }
        let visionStart = DispatchTime.now(), visionPackingBefore = WeightPacking.milliseconds
        let prompts = generator.promptEmbeddings(whole.map { requests[$0] })
        lastVisionMilliseconds = milliseconds(since: visionStart) - (WeightPacking.milliseconds - visionPackingBefore)

        var prefilled = [Generator.RequestState?](repeating: nil, count: fresh.count)
        var flops = [Int](repeating: 2 * c.hiddenSize * c.vocabularySize, count: fresh.count)
        var logits = [[Float]](repeating: [], count: fresh.count)
        for (i, prompt) in zip(whole, prompts) {
            prefilled[i] = freshState(requests[i], embeddings: prompt.embeddings, promptLength: prompt.embeddings.rows, imageSpan: prompt.imageSpan)
            if prompt.imageSpan != nil { flops[i] += generator.visionFlops() }
        }
        // Rows with a KV cache and no prefix held: one packed pass. Rows without a KV cache recompute their sequence
        // (a replayed prefix is simply part of it).
        let cachedWhole = whole.filter { prefilled[$0]!.sparsity.usesKeyValueCache }
        var group = cachedWhole.map { i in
            var state = prefilled[i]!
            state.sequence = takeSequence()
            state.forced = state.request.generatedPrefix
            return state
        }
        if !group.isEmpty {
            var groupFlops = cachedWhole.map { flops[$0] }
            let groupLogits = generator.prefill(&group, cache: &cache, flops: &groupFlops)
            for (j, i) in cachedWhole.enumerated() {
                prefilled[i] = group[j]
                flops[i] = groupFlops[j]
                logits[i] = groupLogits[j]
            }
        }
        for item in toCompute {
            let state = prefilled[item.row]!, tokens = state.promptLength - state.request.idsAfterImage.count
            let cells = cache.layers.map { $0[state.sequence].prefix(before: Int32(tokens)) }
            let bytes = cells.reduce(0) { $0 + $1.keys.count + $1.values.count + 4 * $1.cellCount }
                + 4 * (item.key.pixelBits.count + item.key.idsBeforeImage.count)
            let entry = PrefixCache.Entry(cells: cells, tokens: tokens, keptImageIndices: state.result.keptImageIndices, byteCount: bytes)
            prefixes[item.key] = entry
            prefixCache.insert(entry, for: item.key)
        }
        // The other rows on a shared prefix: its cells, then their own tokens in one packed pass.
        let keyed = requests.indices.filter { keys[$0] != nil && !computing.contains($0) }
        if !keyed.isEmpty {
            var group = keyed.map { i in
                let request = requests[i], entry = prefixes[keys[i]!]!
                let imageSpan = request.idsBeforeImage.count ..< request.idsBeforeImage.count + patches
                var state = freshState(request, embeddings: generator.model.language.embed(request.idsAfterImage),
                                       promptLength: entry.tokens + request.idsAfterImage.count, imageSpan: imageSpan)
                state.cachedPrefixLength = entry.tokens
                state.sequence = takeSequence()
                state.forced = request.generatedPrefix
                for l in cache.layers.indices { cache.layers[l][state.sequence] = entry.cells[l] }
                state.result.stats.imageTokensKept = entry.keptImageIndices?.count ?? patches
                state.result.keptImageIndices = entry.keptImageIndices
                state.result.stats.keptImageIndices = entry.keptImageIndices
                state.result.stats.cachedPrefixTokens = entry.tokens
                return state
            }
            var groupFlops = keyed.map { flops[$0] }
            let groupLogits = generator.prefill(&group, cache: &cache, flops: &groupFlops)
            for (j, i) in keyed.enumerated() {
                prefilled[i] = group[j]
                flops[i] = groupFlops[j]
                logits[i] = groupLogits[j]
            }
        }
        for i in prefilled.indices where prefilled[i]!.sparsity.usesKeyValueCache {
            prefilled[i]!.result.stats.kvCellsPerLayer = cache.cellCounts(sequence: prefilled[i]!.sequence)
            cache.reserveCapacity(sequence: prefilled[i]!.sequence, additionalCells: generator.cellsToCome(prefilled[i]!))
        }
        for i in prefilled.indices where !prefilled[i]!.sparsity.usesKeyValueCache {
            prefilled[i]!.result.tokenIDs = prefilled[i]!.request.generatedPrefix
            logits[i] = generator.recompute(&prefilled[i]!, flops: &flops[i])
        }
        let packing = WeightPacking.milliseconds - packingBefore
        let elapsed = milliseconds(since: start) - packing
        for (i, (row, _)) in fresh.enumerated() {
            var state = prefilled[i]!
            state.result.stats.prefillMilliseconds = elapsed
            state.result.stats.packingMilliseconds = packing > 0 ? packing : nil
            state.result.stats.prefillFlops = flops[i]
            generator.accept(logits[i], into: &state, cellsNow: state.result.stats.kvCellsPerLayer)
            states[row] = state
        }
    }

    /// A new row's state before prefill (no cache sequence yet), with the statistics known from its prompt.
    func freshState(_ request: GenerationRequest, embeddings: Matrix, promptLength: Int, imageSpan: Range<Int>?) -> Generator.RequestState {
        var state = Generator.RequestState(request: request, sequence: -1, sampler: Sampler(request.parameters.sampling),
                                           promptEmbeddings: embeddings, promptLength: promptLength, imageSpan: imageSpan)
        state.result.stats.promptTokens = promptLength
        state.result.stats.precision = Kernels.precision
        state.result.stats.imageTokensTotal = imageSpan?.count ?? 0
        return state
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
