/// The K/V cells of one sequence in one layer, with per-cell metadata kept apart from the storage.
///
/// Cells are in the order they were written; `positions[i]` is cell `i`'s ORIGINAL RoPE position
/// (never re-indexed when earlier tokens are dropped). `keys` and `values` are
/// `[cellCount, keyValueWidth]`, row-major.
public struct SequenceCells: Sendable, Equatable {
    public var positions: [Int32] = []
    public var keys: [Float] = []
    public var values: [Float] = []

    public init() {}

    public init(positions: [Int32], keys: [Float], values: [Float]) {
        self.positions = positions
        self.keys = keys
        self.values = values
    }

    public var cellCount: Int { positions.count }

    /// Makes room for `count` more cells of `width` floats, so that appending them never grows
    /// the arrays (a decode step then appends without reallocating).
    public mutating func reserveCapacity(additionalCells count: Int, width: Int) {
        positions.reserveCapacity(cellCount + count)
        keys.reserveCapacity((cellCount + count) * width)
        values.reserveCapacity((cellCount + count) * width)
    }

    /// Appends cells: `positions` `[n]`, `keys` and `values` `[n, width]`.
    mutating func append(positions newPositions: ArraySlice<Int32>, keys newKeys: ArraySlice<Float>, values newValues: ArraySlice<Float>) {
        positions.append(contentsOf: newPositions)
        keys.append(contentsOf: newKeys)
        values.append(contentsOf: newValues)
    }

    /// The additive attention mask `[writes.count, cellCount]` for the last `writes.count` cells,
    /// just appended by one pass: every earlier cell is visible; among the new ones, causal, and a
    /// token that does not write K/V is visible only to itself. Nil when nothing is hidden (one
    /// new token sees every cell and itself).
    func attentionMask(newTokens writes: ArraySlice<Bool>) -> [Float]? {
        let queryCount = writes.count, keyCount = cellCount, previous = keyCount - queryCount
        guard queryCount > 1 else { return nil }
        var mask = [Float](repeating: 0, count: queryCount * keyCount)
        for (q, _) in writes.enumerated() {
            for (j, writesKeyValue) in writes.enumerated() where !(j == q || (j < q && writesKeyValue)) {
                mask[q * keyCount + previous + j] = -.infinity
            }
        }
        return mask
    }

    /// Drops, among the last `writes.count` cells, those whose token does not write K/V (order kept).
    mutating func compactNewest(writes: ArraySlice<Bool>, width: Int) {
        let previous = cellCount - writes.count
        var kept = previous
        for (j, writesKeyValue) in writes.enumerated() where writesKeyValue {
            let source = previous + j
            if source != kept {
                positions[kept] = positions[source]
                for i in 0..<width {
                    keys[kept * width + i] = keys[source * width + i]
                    values[kept * width + i] = values[source * width + i]
                }
            }
            kept += 1
        }
        let dropped = cellCount - kept
        positions.removeLast(dropped)
        keys.removeLast(dropped * width)
        values.removeLast(dropped * width)
    }
}

/// The KV cache of a batch: for every layer, the cells of every sequence (row) of the batch.
///
/// `layers[l][s]` holds sequence `s`'s cells in layer `l`. Different layers of one sequence may
/// hold different cells (Dynamic-LLaVA keeps fewer above the sparse layer); masks are derived
/// from the cells' positions, so nothing is ever padded.
public struct KeyValueCache: Sendable, Equatable {
    public let keyValueWidth: Int
    public var layers: [[SequenceCells]]

    public init(layers: Int, sequences: Int, keyValueWidth: Int) {
        self.keyValueWidth = keyValueWidth
        self.layers = Array(repeating: Array(repeating: SequenceCells(), count: sequences), count: layers)
    }

    public var sequenceCount: Int { layers.first?.count ?? 0 }

    /// Cells per layer for sequence `s`.
    public func cellCounts(sequence s: Int) -> [Int] {
        layers.map { $0[s].cellCount }
    }

    /// Bytes of K and V held (f32), all layers and sequences.
    public var byteCount: Int {
        layers.reduce(0) { total, layer in total + layer.reduce(0) { $0 + $1.cellCount * keyValueWidth * 2 * 4 } }
    }

    /// Adds an empty sequence to every layer and returns its index.
    public mutating func appendSequence() -> Int {
        for l in layers.indices { layers[l].append(SequenceCells()) }
        return sequenceCount - 1
    }

    /// Empties sequence `s` in every layer (its storage is released; the index stays valid).
    public mutating func clear(sequence s: Int) {
        for l in layers.indices { layers[l][s] = SequenceCells() }
    }

    /// Reserves room for `count` more cells of sequence `s` in every layer.
    public mutating func reserveCapacity(sequence s: Int, additionalCells count: Int) {
        for l in layers.indices { layers[l][s].reserveCapacity(additionalCells: count, width: keyValueWidth) }
    }
}

/// Per-token inputs of one forward pass over a packed batch (llama.cpp's `llama_batch`).
///
/// Tokens of one sequence are contiguous and in increasing position order. Nothing is padded:
/// the sequences' token counts may all differ.
public struct TokenBatch: Sendable, Equatable {
    /// `[T]` RoPE position of each token (its index in the unpruned sequence).
    public var positions: [Int32]
    /// `[T]` cache sequence (row) each token belongs to.
    public var sequences: [Int]
    /// `[T]` whether the token's K/V enter the cache in the layers this pass runs. A token whose
    /// K/V do not enter still attends to itself (and to the cache); no other token sees it.
    public var writesKeyValue: [Bool]

    public init(positions: [Int32], sequences: [Int], writesKeyValue: [Bool]? = nil) {
        precondition(positions.count == sequences.count, "TokenBatch: positions and sequences differ in length")
        self.positions = positions
        self.sequences = sequences
        self.writesKeyValue = writesKeyValue ?? Array(repeating: true, count: positions.count)
    }

    public var count: Int { positions.count }

    /// Contiguous token ranges, one per sequence, in batch order.
    public var spans: [(sequence: Int, tokens: Range<Int>)] {
        var result: [(Int, Range<Int>)] = []
        var start = 0
        while start < sequences.count {
            var end = start + 1
            while end < sequences.count && sequences[end] == sequences[start] { end += 1 }
            precondition(!result.contains { $0.0 == sequences[start] }, "TokenBatch: sequence \(sequences[start]) is not contiguous")
            result.append((sequences[start], start..<end))
            start = end
        }
        return result
    }

    /// The batch restricted to tokens `indices` (in order).
    public func selecting(_ indices: [Int]) -> TokenBatch {
        TokenBatch(positions: indices.map { positions[$0] }, sequences: indices.map { sequences[$0] },
                   writesKeyValue: indices.map { writesKeyValue[$0] })
    }
}
