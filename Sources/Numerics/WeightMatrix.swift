import CKernels
import Foundation

/// How a weight's elements are stored.
public enum StorageType: String, Sendable, Codable {
    case float32 = "F32"
    case float16 = "F16"
    case bfloat16 = "BF16"
    /// 8-bit blocks (llama.cpp's q8_0): per row, blocks of 32 values along the columns, each 32
    /// int8 quants in -127...127 and an f16 scale (`value = scale · quant`); the last block is
    /// padded with zeros. Quants `[rows, blocks · 32]` at `base`, scales `[rows, blocks]` at
    /// `scales`. Computed by the 8-bit kernels (`dl_gemm_q8`), activations quantized on the fly.
    case q8 = "Q8_0"

    /// Bytes per stored element (a q8 quant; its block scales are counted by `WeightMatrix.byteCount`).
    public var byteCount: Int {
        switch self {
        case .float32: 4
        case .float16, .bfloat16: 2
        case .q8: 1
        }
    }
}

/// The layout arithmetic of q8 weights.
public enum Q8Layout {
    public static let blockSize = Int(DL_Q8_BLOCK)

    /// Blocks per row of `columns` values.
    public static func blocks(columns: Int) -> Int { (columns + blockSize - 1) / blockSize }

    /// The index of the first quant outside -127...127 (that is, -128), nil when all are valid.
    public static func firstInvalidQuant(_ quants: UnsafePointer<Int8>, count: Int) -> Int? {
        let index = dl_q8_find_invalid_quant(quants, count)
        return index < 0 ? nil : index
    }
}

/// Keeps the memory behind weights alive (an mmap'd file, or an owned allocation).
public protocol StorageOwner: AnyObject, Sendable {
    /// Tells the owner that `byteCount` bytes from `start` will rarely be read again (their
    /// packed copy serves the products), so a file mapping can drop those pages from memory.
    func releasePages(from start: UnsafeRawPointer, byteCount: Int)
}

extension StorageOwner {
    public func releasePages(from start: UnsafeRawPointer, byteCount: Int) {}
}

/// Owned, aligned raw memory, freed on deinit.
public final class OwnedStorage: StorageOwner, @unchecked Sendable {
    public let pointer: UnsafeMutableRawPointer
    public let byteCount: Int

    public init(byteCount: Int) {
        self.byteCount = byteCount
        pointer = UnsafeMutableRawPointer.allocate(byteCount: max(byteCount, 1), alignment: 64)
    }

    deinit { pointer.deallocate() }
}

/// A 2-D weight `[rows, columns]` in its stored dtype (f32, f16 or bf16), row-major, never
/// widened as a whole by the hot path: `widenRows` converts a band of rows into f32 on demand.
///
/// For a linear layer the PyTorch convention holds: `rows` = out features, `columns` = in features.
public struct WeightMatrix: @unchecked Sendable {
    public let rows: Int
    public let columns: Int
    public let storageType: StorageType
    public let base: UnsafeRawPointer
    /// q8 only: the f16 block scales `[rows, blocks]`.
    public let scales: UnsafeRawPointer?
    public let owner: StorageOwner
    /// The packed panels of the f32 kernels, made on first use and shared by copies of this value.
    private let panelCache = PanelCache()
    /// The bf16 panels of the AMX kernel, likewise.
    private let panelCacheBF16 = PanelCache()

    public init(rows: Int, columns: Int, storageType: StorageType, base: UnsafeRawPointer, scales: UnsafeRawPointer? = nil,
                owner: StorageOwner) {
        precondition((storageType == .q8) == (scales != nil), "WeightMatrix: q8 weights, and only they, have block scales")
        self.rows = rows
        self.columns = columns
        self.storageType = storageType
        self.base = base
        self.scales = scales
        self.owner = owner
    }

    /// Copies `values` into a new weight of the given storage type (rounding to nearest even, or
    /// quantizing to q8; q8 needs finite values whose block scales fit in f16).
    public init(rows: Int, columns: Int, values: [Float], storageType: StorageType = .float32) {
        precondition(values.count == rows * columns, "WeightMatrix: \(values.count) values for [\(rows), \(columns)]")
        if storageType == .q8 {
            let float = WeightMatrix(rows: rows, columns: columns, values: values)
            guard let quantized = float.quantizedQ8() else { preconditionFailure("WeightMatrix: values cannot be quantized to q8") }
            self = quantized
            return
        }
        let storage = OwnedStorage(byteCount: values.count * storageType.byteCount)
        values.withUnsafeBufferPointer { source in
            let count = source.count
            guard let sourceBase = source.baseAddress else { return }
            switch storageType {
            case .float32: storage.pointer.copyMemory(from: sourceBase, byteCount: count * 4)
            case .float16: dl_narrow_f16(sourceBase, storage.pointer.assumingMemoryBound(to: UInt16.self), count)
            case .bfloat16: dl_narrow_bf16(sourceBase, storage.pointer.assumingMemoryBound(to: UInt16.self), count)
            case .q8: break
            }
        }
        self.init(rows: rows, columns: columns, storageType: storageType, base: UnsafeRawPointer(storage.pointer), owner: storage)
    }

    public var elementCount: Int { rows * columns }

    /// Bytes the weight occupies (for q8: padded quants and f16 scales).
    public var byteCount: Int {
        storageType == .q8 ? rows * Q8Layout.blocks(columns: columns) * (Q8Layout.blockSize + 2) : elementCount * storageType.byteCount
    }

    /// The weight quantized to q8 (`dl_quantize_weights_q8`), in owned memory: quants then
    /// scales. Nil when an element is not finite or a block's scale overflows f16.
    public func quantizedQ8() -> WeightMatrix? {
        let blocks = Q8Layout.blocks(columns: columns), quantBytes = rows * blocks * Q8Layout.blockSize
        let storage = OwnedStorage(byteCount: quantBytes + rows * blocks * 2)
        let scales = storage.pointer + quantBytes
        let bandRows = max(1, (1 << 22) / max(columns, 1))
        var band = [Float](repeating: 0, count: min(rows, bandRows) * columns)
        for start in stride(from: 0, to: rows, by: bandRows) {
            let end = min(rows, start + bandRows)
            let failed = band.withUnsafeMutableBufferPointer { buffer in
                widenRows(start..<end, into: buffer.baseAddress!)
                return dl_quantize_weights_q8(buffer.baseAddress!, end - start, columns,
                                              storage.pointer.assumingMemoryBound(to: Int8.self) + start * blocks * Q8Layout.blockSize,
                                              scales.assumingMemoryBound(to: UInt16.self) + start * blocks) >= 0
            }
            if failed { return nil }
        }
        return WeightMatrix(rows: rows, columns: columns, storageType: .q8, base: UnsafeRawPointer(storage.pointer),
                            scales: UnsafeRawPointer(scales), owner: storage)
    }

    /// Widens rows `range` into `destination` (`range.count * columns` floats).
    public func widenRows(_ range: Range<Int>, into destination: UnsafeMutablePointer<Float>) {
        let start = range.lowerBound * columns
        let count = range.count * columns
        switch storageType {
        case .float32:
            destination.update(from: base.assumingMemoryBound(to: Float.self) + start, count: count)
        case .float16:
            dl_widen_f16(base.assumingMemoryBound(to: UInt16.self) + start, destination, count)
        case .bfloat16:
            dl_widen_bf16(base.assumingMemoryBound(to: UInt16.self) + start, destination, count)
        case .q8:
            let blocks = Q8Layout.blocks(columns: columns)
            var blockScales = [Float](repeating: 0, count: blocks)
            for (index, row) in range.enumerated() {
                dl_widen_f16(scales!.assumingMemoryBound(to: UInt16.self) + row * blocks, &blockScales, blocks)
                let quants = base.assumingMemoryBound(to: Int8.self) + row * blocks * Q8Layout.blockSize
                for column in 0..<columns {
                    destination[index * columns + column] = Float(quants[column]) * blockScales[column / Q8Layout.blockSize]
                }
            }
        }
    }

    /// All elements widened to f32 (for small weights: norms, biases, embedding tables of tiny models).
    public func widened() -> [Float] {
        widenedRows(0..<rows)
    }

    /// Rows `range` widened to f32, flattened.
    public func widenedRows(_ range: Range<Int>) -> [Float] {
        let count = range.count * columns
        return [Float](unsafeUninitializedCapacity: count) { buffer, initialized in
            if count > 0 { widenRows(range, into: buffer.baseAddress!) }
            initialized = count
        }
    }

    /// The weight packed into panels of 16 columns for `dl_gemm_panels` (f32, f16 or bf16 kept as
    /// stored): made once, on first use, by all workers; the stored rows' pages are then released
    /// to their owner (a mapped checkpoint drops them from memory; they are read back only if a
    /// row is widened again).
    func panels() -> UnsafeRawPointer {
        packed(into: panelCache, byteCount: dl_panel_bytes(storageType.kernelType, rows, columns), with: dl_pack_panels)
    }

    /// The weight rounded to bf16 and packed into panels of pairs of k (AMX B tiles) for
    /// `dl_gemm_bf16_panels` and `dl_gemm_amx`: made once, on first use; the stored rows' pages are
    /// then released as for `panels()`.
    func panelsBF16() -> UnsafeRawPointer {
        packed(into: panelCacheBF16, byteCount: dl_panel_bytes_bf16(rows, columns), with: dl_pack_panels_bf16)
    }

    /// Packs the weight once into `cache` (`byteCount` bytes) with a packer of f32_panels.c or bf16_panels.c,
    /// groups of 64 panels spread over the workers, then releases the stored rows' pages.
    private func packed(into cache: PanelCache, byteCount packedBytes: Int,
                        with pack: @escaping @Sendable (Int32, UnsafeRawPointer?, Int, Int, Int, UnsafeMutableRawPointer?, Int, Int) -> Void)
        -> UnsafeRawPointer {
        precondition(storageType != .q8, "panels: q8 weights go through dl_gemm_q8")
        return cache.panels {
            let type = storageType.kernelType, rows = rows, columns = columns
            let storage = OwnedStorage(byteCount: packedBytes)
            let panelCount = (rows + 15) / 16, chunk = 64
            let pointers = UncheckedSendable((base, storage.pointer))
            Parallelism.forEach((panelCount + chunk - 1) / chunk) { c in
                let (source, destination) = pointers.value
                pack(type, source, columns, rows, columns, destination, c * chunk, min(panelCount, (c + 1) * chunk))
            }
            owner.releasePages(from: base, byteCount: byteCount)
            return storage
        }
    }

    /// The same memory seen as a `[rows * columns / newColumns, newColumns]` weight.
    public func reshaped(columns newColumns: Int) -> WeightMatrix {
        precondition(storageType != .q8, "reshape: q8 blocks follow the rows")
        precondition(elementCount % newColumns == 0, "reshape: \(elementCount) elements into \(newColumns) columns")
        return WeightMatrix(rows: elementCount / newColumns, columns: newColumns, storageType: storageType, base: base, owner: owner)
    }
}

extension WeightMatrix {
    /// A weight of small random values (magnitudes 2^-9 to 2^-6, random sign), written straight
    /// into its storage type from a seeded integer stream: fast enough to build a 7B model for
    /// benchmarks (values are not meant to be meaningful, only finite and small).
    /// q8: the f16 random weight of the same seed, quantized.
    public init(randomRows rows: Int, columns: Int, storageType: StorageType, seed: UInt64) {
        if storageType == .q8 {
            self = WeightMatrix(randomRows: rows, columns: columns, storageType: .float16, seed: seed).quantizedQ8()!
            return
        }
        let count = rows * columns
        let storage = OwnedStorage(byteCount: count * storageType.byteCount)
        var state = seed &* 0x9E37_79B9_7F4A_7C15 | 1
        @inline(__always) func next() -> UInt64 {
            state ^= state << 13
            state ^= state >> 7
            state ^= state << 17
            return state
        }
        switch storageType {
        case .float32:
            let out = storage.pointer.assumingMemoryBound(to: UInt32.self)
            for i in 0..<count {
                let r = UInt32(truncatingIfNeeded: next())
                // sign | exponent 118...121 | 23 random mantissa bits
                out[i] = (r & 0x8000_0000) | ((118 + (r >> 23 & 3)) << 23) | (r & 0x7F_FFFF)
            }
        case .float16, .bfloat16:
            let out = storage.pointer.assumingMemoryBound(to: UInt16.self)
            let (exponentBase, mantissaBits): (UInt16, UInt16) = storageType == .float16 ? (6, 10) : (118, 7)
            var i = 0
            while i < count {
                var r = next()
                for _ in 0..<4 where i < count {
                    let bits = UInt16(truncatingIfNeeded: r)
                    let exponent = exponentBase + (bits >> 13 & 3)
                    out[i] = (bits & 0x8000) | (exponent << mantissaBits) | (bits & ((1 << mantissaBits) - 1))
                    r >>= 16
                    i += 1
                }
            }
        case .q8: break
        }
        self.init(rows: rows, columns: columns, storageType: storageType, base: UnsafeRawPointer(storage.pointer), owner: storage)
    }
}

/// A weight's packed panels, made once under a lock.
final class PanelCache: @unchecked Sendable {
    private let lock = NSLock()
    private var storage: OwnedStorage?

    func panels(_ make: () -> OwnedStorage) -> UnsafeRawPointer {
        lock.lock()
        defer { lock.unlock() }
        if let storage { return UnsafeRawPointer(storage.pointer) }
        let start = DispatchTime.now().uptimeNanoseconds
        let made = make()
        WeightPacking.add(nanoseconds: DispatchTime.now().uptimeNanoseconds - start)
        storage = made
        return UnsafeRawPointer(made.pointer)
    }
}

/// Time this process has spent packing weights for the kernels (each weight once, on its first product), so
/// that callers can report it apart from the products: the difference of two readings is the packing between them.
public enum WeightPacking {
    private static let lock = NSLock()
    nonisolated(unsafe) private static var nanoseconds: UInt64 = 0

    /// Milliseconds spent packing so far, all weights and threads (packing one weight is itself spread over the workers).
    public static var milliseconds: Double {
        lock.lock()
        defer { lock.unlock() }
        return Double(nanoseconds) / 1e6
    }

    static func add(nanoseconds elapsed: UInt64) {
        lock.lock()
        nanoseconds += elapsed
        lock.unlock()
    }
}
