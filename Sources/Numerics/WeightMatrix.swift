import CKernels

/// How a weight's elements are stored. Compute is always f32.
public enum StorageType: String, Sendable, Codable {
    case float32 = "F32"
    case float16 = "F16"
    case bfloat16 = "BF16"

    public var byteCount: Int { self == .float32 ? 4 : 2 }
}

/// Keeps the memory behind weights alive (an mmap'd file, or an owned allocation).
public protocol StorageOwner: AnyObject, Sendable {}

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
    public let owner: StorageOwner

    public init(rows: Int, columns: Int, storageType: StorageType, base: UnsafeRawPointer, owner: StorageOwner) {
        self.rows = rows
        self.columns = columns
        self.storageType = storageType
        self.base = base
        self.owner = owner
    }

    /// Copies `values` into a new weight of the given storage type (rounding to nearest even).
    public init(rows: Int, columns: Int, values: [Float], storageType: StorageType = .float32) {
        precondition(values.count == rows * columns, "WeightMatrix: \(values.count) values for [\(rows), \(columns)]")
        let storage = OwnedStorage(byteCount: values.count * storageType.byteCount)
        values.withUnsafeBufferPointer { source in
            let count = source.count
            guard let sourceBase = source.baseAddress else { return }
            switch storageType {
            case .float32: storage.pointer.copyMemory(from: sourceBase, byteCount: count * 4)
            case .float16: dl_narrow_f16(sourceBase, storage.pointer.assumingMemoryBound(to: UInt16.self), count)
            case .bfloat16: dl_narrow_bf16(sourceBase, storage.pointer.assumingMemoryBound(to: UInt16.self), count)
            }
        }
        self.init(rows: rows, columns: columns, storageType: storageType, base: UnsafeRawPointer(storage.pointer), owner: storage)
    }

    public var elementCount: Int { rows * columns }
    public var byteCount: Int { elementCount * storageType.byteCount }

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

    /// The same memory seen as a `[rows * columns / newColumns, newColumns]` weight.
    public func reshaped(columns newColumns: Int) -> WeightMatrix {
        precondition(elementCount % newColumns == 0, "reshape: \(elementCount) elements into \(newColumns) columns")
        return WeightMatrix(rows: elementCount / newColumns, columns: newColumns, storageType: storageType, base: base, owner: owner)
    }
}

extension WeightMatrix {
    /// A weight of small random values (magnitudes 2^-9 to 2^-6, random sign), written straight
    /// into its storage type from a seeded integer stream: fast enough to build a 7B model for
    /// benchmarks (values are not meant to be meaningful, only finite and small).
    public init(randomRows rows: Int, columns: Int, storageType: StorageType, seed: UInt64) {
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
        }
        self.init(rows: rows, columns: columns, storageType: storageType, base: UnsafeRawPointer(storage.pointer), owner: storage)
    }
}
