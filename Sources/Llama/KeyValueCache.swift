import CKernels
import Numerics

/// The K/V cells of one sequence in one layer, with per-cell metadata kept apart from the storage.
///
/// Cells are in the order they were written; `positions[i]` is cell `i`'s ORIGINAL RoPE position
/// (never re-indexed when earlier tokens are dropped). `keys` and `values` are
/// `[cellCount, keyValueWidth]`, row-major, as the bytes of `storage`'s elements (f32, or bf16:
/// what `--precision bf16` keeps, as PyTorch's bf16 and llama.cpp's f16 caches do, for half the
/// memory and half the bytes each decode step reads). Cells are rounded once, when appended.
public struct SequenceCells: Sendable, Equatable {
    /// `.float32` or `.bfloat16`.
    public private(set) var storage: StorageType
    public private(set) var positions: [Int32] = []
    public private(set) var keys: [UInt8] = []
    public private(set) var values: [UInt8] = []

    public init(storage: StorageType = .float32) {
        precondition(storage == .float32 || storage == .bfloat16, "SequenceCells: K/V are stored as f32 or bf16, not \(storage)")
        self.storage = storage
    }

    /// Cells as stored: `keys` and `values` hold `positions.count * width` elements of `storage` each.
    public init(storage: StorageType, positions: [Int32], keys: [UInt8], values: [UInt8]) {
        self.init(storage: storage)
        precondition(keys.count == values.count && keys.count % max(positions.count * storage.byteCount, 1) == 0,
                     "SequenceCells: \(keys.count) key and \(values.count) value bytes for \(positions.count) cells")
        self.positions = positions
        self.keys = keys
        self.values = values
    }

    public var cellCount: Int { positions.count }

    /// Makes room for `count` more cells of `width` elements, so that appending them never grows
    /// the arrays (a decode step then appends without reallocating).
    public mutating func reserveCapacity(additionalCells count: Int, width: Int) {
        positions.reserveCapacity(cellCount + count)
        keys.reserveCapacity(keys.count + count * width * storage.byteCount)
        values.reserveCapacity(values.count + count * width * storage.byteCount)
    }

    /// Appends cells: `positions` `[n]`, `keys` and `values` `[n, width]` f32, rounded to `storage`.
    mutating func append(positions newPositions: ArraySlice<Int32>, keys newKeys: ArraySlice<Float>, values newValues: ArraySlice<Float>) {
        positions.append(contentsOf: newPositions)
        Self.append(newKeys, to: &keys, as: storage)
        Self.append(newValues, to: &values, as: storage)
    }

    /// Appends cells as stored (a snapshot's): `positions` `[n]`, `keys` and `values` the bytes of
    /// `[n, width]` elements of `storage`.
    public mutating func append(positions newPositions: [Int32], storedKeys: some Collection<UInt8>, storedValues: some Collection<UInt8>) {
        precondition(storedKeys.count == storedValues.count, "SequenceCells: \(storedKeys.count) key and \(storedValues.count) value bytes")
        positions.append(contentsOf: newPositions)
        keys.append(contentsOf: storedKeys)
        values.append(contentsOf: storedValues)
    }

    private static func append(_ elements: ArraySlice<Float>, to bytes: inout [UInt8], as storage: StorageType) {
        elements.withUnsafeBufferPointer { source in
            guard storage == .bfloat16 else { bytes.append(contentsOf: UnsafeRawBufferPointer(source)); return }
            let start = bytes.count
            bytes.append(contentsOf: repeatElement(0, count: source.count * 2))
            bytes.withUnsafeMutableBytes { destination in
                dl_narrow_bf16(source.baseAddress!, (destination.baseAddress! + start).assumingMemoryBound(to: UInt16.self), source.count)
            }
        }
    }

    /// The cells' keys and values widened to f32 (tests, tools): `[cellCount, width]` each.
    public var floatKeysAndValues: (keys: [Float], values: [Float]) {
        func widen(_ bytes: [UInt8]) -> [Float] {
            bytes.withUnsafeBytes { raw in
                guard storage == .bfloat16 else { return Array(raw.bindMemory(to: Float.self)) }
                let halves = raw.bindMemory(to: UInt16.self)
                return [Float](unsafeUninitializedCapacity: halves.count) { out, count in
                    dl_widen_bf16(halves.baseAddress!, out.baseAddress!, halves.count)
                    count = halves.count
                }
            }
        }
        return (widen(keys), widen(values))
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

    private static func moveRow(in bytes: inout [UInt8], from source: Int, to destination: Int, rowBytes: Int) {
        bytes.withUnsafeMutableBytes { b in
            (b.baseAddress! + destination * rowBytes).copyMemory(from: b.baseAddress! + source * rowBytes, byteCount: rowBytes)
        }
    }

    /// The leading cells whose positions are below `position` (cells are written in increasing position order
    /// within a prompt): the cells of the prompt's first `position` tokens.
    public func prefix(before position: Int32) -> SequenceCells {
        let count = positions.firstIndex { $0 >= position } ?? cellCount
        let rowBytes = count == 0 ? 0 : keys.count / cellCount
        return SequenceCells(storage: storage, positions: Array(positions[..<count]), keys: Array(keys[..<(count * rowBytes)]),
                             values: Array(values[..<(count * rowBytes)]))
    }

    /// Drops, among the last `writes.count` cells, those whose token does not write K/V (order kept).
    mutating func compactNewest(writes: ArraySlice<Bool>, width: Int) {
        let previous = cellCount - writes.count, rowBytes = width * storage.byteCount
        var kept = previous
        for (j, writesKeyValue) in writes.enumerated() where writesKeyValue {
            let source = previous + j
            if source != kept {
                positions[kept] = positions[source]
                Self.moveRow(in: &keys, from: source, to: kept, rowBytes: rowBytes)
                Self.moveRow(in: &values, from: source, to: kept, rowBytes: rowBytes)
            }
            kept += 1
        }
        let dropped = cellCount - kept
        positions.removeLast(dropped)
        keys.removeLast(dropped * rowBytes)
        values.removeLast(dropped * rowBytes)
    }
}

/// The KV cache of a batch: for every layer, the cells of every sequence (row) of the batch.
///
/// `layers[l][s]` holds sequence `s`'s cells in layer `l`. Different layers of one sequence may
/// hold different cells (Dynamic-LLaVA keeps fewer above the sparse layer); masks are derived
/// from the cells' positions, so nothing is ever padded.
public struct KeyValueCache: Sendable, Equatable {
    public let keyValueWidth: Int
    /// How every sequence's K/V are stored (`.float32` or `.bfloat16`).
    public let storage: StorageType
    public var layers: [[SequenceCells]]

    public init(layers: Int, sequences: Int, keyValueWidth: Int, storage: StorageType = .float32) {
        self.keyValueWidth = keyValueWidth
        self.storage = storage
        self.layers = Array(repeating: Array(repeating: SequenceCells(storage: storage), count: sequences), count: layers)
    }

    /// The storage a cache computed at `precision` keeps: bf16 K/V at bf16, f32 at f32.
    public static func storage(for precision: Precision) -> StorageType {
        precision == .bf16 ? .bfloat16 : .float32
    }

    public var sequenceCount: Int { layers.first?.count ?? 0 }

    /// Cells per layer for sequence `s`.
    public func cellCounts(sequence s: Int) -> [Int] {
        layers.map { $0[s].cellCount }
    }

    /// Bytes of K and V held, all layers and sequences.
    public var byteCount: Int {
        layers.reduce(0) { total, layer in total + layer.reduce(0) { $0 + $1.keys.count + $1.values.count } }
    }

    /// Adds an empty sequence to every layer and returns its index.
    public mutating func appendSequence() -> Int {
        for l in layers.indices { layers[l].append(SequenceCells(storage: storage)) }
        return sequenceCount - 1
    }

    /// Empties sequence `s` in every layer (its storage is released; the index stays valid).
    public mutating func clear(sequence s: Int) {
        for l in layers.indices { layers[l][s] = SequenceCells(storage: storage) }
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
