import Foundation
import Numerics

/// Why a checkpoint could not be read. Every case names the file (and the tensor where there is one).
public enum CheckpointError: Error, CustomStringConvertible, Equatable {
    /// The file cannot be opened or mapped.
    case unreadable(file: String, reason: String)
    /// The bytes are not a valid safetensors file (short header, bad JSON, offsets out of range...).
    case malformed(file: String, reason: String)
    /// A tensor the model needs is absent.
    case missingTensor(file: String, tensor: String)
    /// A tensor has a shape other than the configuration implies.
    case wrongShape(file: String, tensor: String, expected: [Int], found: [Int])
    /// A tensor's dtype is not one the engine computes with.
    case unsupportedDType(file: String, tensor: String, dtype: String)
    /// config.json (or another JSON description) is missing or invalid.
    case invalidConfiguration(file: String, reason: String)
    /// A file of a model being written (`dllava quantize`) cannot be created or written.
    case unwritable(file: String, reason: String)

    public var description: String {
        switch self {
        case .unreadable(let file, let reason): return "\(file): cannot read: \(reason)"
        case .malformed(let file, let reason): return "\(file): not a valid safetensors file: \(reason)"
        case .missingTensor(let file, let tensor): return "\(file): tensor '\(tensor)' is missing"
        case .wrongShape(let file, let tensor, let expected, let found):
            return "\(file): tensor '\(tensor)' has shape \(found), expected \(expected)"
        case .unsupportedDType(let file, let tensor, let dtype):
            return "\(file): tensor '\(tensor)' has unsupported dtype \(dtype) (supported: F32, F16, BF16)"
        case .invalidConfiguration(let file, let reason): return "\(file): invalid configuration: \(reason)"
        case .unwritable(let file, let reason): return "\(file): cannot write: \(reason)"
        }
    }

    /// sysexits-style code: 78 (configuration) for a model that does not fit its description,
    /// 65 (data) for unreadable or corrupt bytes, 74 (I/O) for a file that cannot be written.
    public var exitCode: Int32 {
        switch self {
        case .unwritable: return 74
        case .unreadable, .malformed: return 65
        case .missingTensor, .wrongShape, .unsupportedDType, .invalidConfiguration: return 78
        }
    }
}

/// The dtypes a safetensors header may name that this reader understands.
public enum TensorDType: String, Sendable {
    case f32 = "F32", f16 = "F16", bf16 = "BF16", i64 = "I64", i32 = "I32", i8 = "I8", u8 = "U8", bool = "BOOL"

    public var byteCount: Int {
        switch self {
        case .f32, .i32: return 4
        case .f16, .bf16: return 2
        case .i64: return 8
        case .i8, .u8, .bool: return 1
        }
    }

    var storageType: StorageType? {
        switch self {
        case .f32: return .float32
        case .f16: return .float16
        case .bf16: return .bfloat16
        default: return nil
        }
    }
}

/// A read-only memory map of a whole file, unmapped on deinit.
public final class MappedFile: StorageOwner, @unchecked Sendable {
    public let path: String
    public let base: UnsafeRawPointer
    public let byteCount: Int

    public init(path: String) throws(CheckpointError) {
        self.path = path
        let descriptor = open(path, O_RDONLY)
        guard descriptor >= 0 else { throw .unreadable(file: path, reason: String(cString: strerror(errno))) }
        defer { close(descriptor) }
        var status = stat()
        guard fstat(descriptor, &status) == 0 else { throw .unreadable(file: path, reason: String(cString: strerror(errno))) }
        byteCount = Int(status.st_size)
        guard byteCount > 0 else { throw .malformed(file: path, reason: "the file is empty") }
        guard let mapped = mmap(nil, byteCount, PROT_READ, MAP_PRIVATE, descriptor, 0), mapped != MAP_FAILED else {
            throw .unreadable(file: path, reason: "mmap failed: \(String(cString: strerror(errno)))")
        }
        base = UnsafeRawPointer(mapped)
    }

    deinit { munmap(UnsafeMutableRawPointer(mutating: base), byteCount) }

    /// Drops the whole pages inside the range from this process's memory (`MADV_DONTNEED`): the
    /// mapping is private and never written, so a later read brings them back from the file.
    public func releasePages(from start: UnsafeRawPointer, byteCount: Int) {
        let pageSize = Int(sysconf(Int32(_SC_PAGESIZE)))
        let first = (Int(bitPattern: start) + pageSize - 1) / pageSize * pageSize
        let end = (Int(bitPattern: start) + byteCount) / pageSize * pageSize
        guard end > first, let pointer = UnsafeMutableRawPointer(bitPattern: first) else { return }
        madvise(pointer, end - first, MADV_DONTNEED)
    }
}

/// One tensor inside a mapped safetensors file.
public struct TensorView: @unchecked Sendable {
    public let name: String
    public let dtype: TensorDType
    public let shape: [Int]
    public let file: MappedFile
    /// Start of the tensor's bytes inside `file`.
    public let base: UnsafeRawPointer
    /// The file's `dllava_quantization` metadata (`Q8Checkpoint.format`), nil for a float checkpoint.
    public let quantization: String?

    /// The tensor's bytes.
    public var byteCount: Int { elementCount * dtype.byteCount }

    public var elementCount: Int { shape.reduce(1, *) }

    /// The tensor as a 2-D weight: `[shape[0], product of the rest]` (a 1-D tensor is `[1, n]`),
    /// kept in its stored dtype.
    public func weight() throws(CheckpointError) -> WeightMatrix {
        guard let storageType = dtype.storageType else {
            throw .unsupportedDType(file: file.path, tensor: name, dtype: dtype.rawValue)
        }
        let rows = shape.count <= 1 ? 1 : shape[0]
        let columns = rows == 0 ? 0 : elementCount / rows
        return WeightMatrix(rows: rows, columns: columns, storageType: storageType, base: base, owner: file)
    }

    /// All elements widened to f32.
    public func floats() throws(CheckpointError) -> [Float] {
        try weight().widened()
    }

    /// All elements of an integer tensor (I32 or I64).
    public func integers() throws(CheckpointError) -> [Int] {
        switch dtype {
        case .i64: return (0..<elementCount).map { Int(base.loadUnaligned(fromByteOffset: $0 * 8, as: Int64.self)) }
        case .i32: return (0..<elementCount).map { Int(base.loadUnaligned(fromByteOffset: $0 * 4, as: Int32.self)) }
        default: throw .unsupportedDType(file: file.path, tensor: name, dtype: dtype.rawValue)
        }
    }
}

/// A single `.safetensors` file, mapped and with its header validated.
///
/// Format: 8-byte little-endian header length N, N bytes of JSON
/// `{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}`, then the data;
/// offsets are relative to the end of the header.
public struct SafeTensorsFile: Sendable {
    public let file: MappedFile
    public let tensors: [String: TensorView]
    public let metadata: [String: String]

    public init(path: String) throws(CheckpointError) {
        let file = try MappedFile(path: path)
        self.file = file
        guard file.byteCount >= 8 else { throw .malformed(file: path, reason: "shorter than the 8-byte header length") }
        let headerLength = Int(UInt64(littleEndian: file.base.loadUnaligned(as: UInt64.self)))
        guard headerLength > 0, headerLength <= file.byteCount - 8 else {
            throw .malformed(file: path, reason: "header length \(headerLength) does not fit in a file of \(file.byteCount) bytes")
        }
        let headerBytes = Data(bytes: file.base + 8, count: headerLength)
        var metadata: [String: String] = [:]
        guard let header = (try? JSONSerialization.jsonObject(with: headerBytes)) as? [String: Any] else {
            throw .malformed(file: path, reason: "the header is not a JSON object")
        }
        for (key, item) in (header["__metadata__"] as? [String: Any]) ?? [:] { metadata[key] = item as? String }
        let quantization = metadata[Q8Checkpoint.metadataKey]
        if let quantization, quantization != Q8Checkpoint.format {
            throw .invalidConfiguration(file: path, reason: "\(Q8Checkpoint.metadataKey) '\(quantization)' is not a quantization this reader knows (\(Q8Checkpoint.format))")
        }
        let dataStart = 8 + headerLength
        let dataLength = file.byteCount - dataStart
        var tensors: [String: TensorView] = [:]
        var extents: [(begin: Int, end: Int, name: String)] = []
        for (name, value) in header {
            if name == "__metadata__" { continue }
            guard let entry = value as? [String: Any],
                  let dtypeName = entry["dtype"] as? String,
                  let shape = entry["shape"] as? [Int],
                  let offsets = entry["data_offsets"] as? [Int], offsets.count == 2
            else { throw .malformed(file: path, reason: "tensor '\(name)' lacks dtype, shape or data_offsets") }
            guard let dtype = TensorDType(rawValue: dtypeName) else {
                throw .unsupportedDType(file: path, tensor: name, dtype: dtypeName)
            }
            guard shape.allSatisfy({ $0 >= 0 }) else { throw .malformed(file: path, reason: "tensor '\(name)' has a negative dimension") }
            let (begin, end) = (offsets[0], offsets[1])
            guard begin >= 0, end >= begin, end <= dataLength else {
                throw .malformed(file: path, reason: "tensor '\(name)' data_offsets [\(begin), \(end)] lie outside the \(dataLength) data bytes (truncated file?)")
            }
            let (count, overflow) = shape.reduce((1, false)) { acc, d in
                let (p, o) = acc.0.multipliedReportingOverflow(by: d); return (p, acc.1 || o)
            }
            guard !overflow, count * dtype.byteCount == end - begin else {
                throw .malformed(file: path, reason: "tensor '\(name)' has \(end - begin) bytes, but shape \(shape) of \(dtypeName) needs \(overflow ? -1 : count * dtype.byteCount)")
            }
            extents.append((begin, end, name))
            tensors[name] = TensorView(name: name, dtype: dtype, shape: shape, file: file, base: file.base + dataStart + begin,
                                       quantization: quantization)
        }
        extents.sort { ($0.begin, $0.end) < ($1.begin, $1.end) }
        for (previous, next) in zip(extents, extents.dropFirst()) where next.begin < previous.end {
            throw .malformed(file: path, reason: "tensors '\(previous.name)' and '\(next.name)' overlap")
        }
        self.tensors = tensors
        self.metadata = metadata
    }
}

/// All safetensors of a model directory: `model.safetensors`, or the shards listed by
/// `model.safetensors.index.json` (`{"weight_map": {tensor: file}}`), or every `*.safetensors`.
public struct Checkpoint: Sendable {
    public let directory: URL
    public private(set) var tensors: [String: TensorView] = [:]

    public init(directory: URL) throws(CheckpointError) {
        self.directory = directory
        let fileManager = FileManager.default
        let index = directory.appendingPathComponent("model.safetensors.index.json")
        var files: [String]
        if fileManager.fileExists(atPath: index.path) {
            guard let data = fileManager.contents(atPath: index.path),
                  let json = (try? JSONSerialization.jsonObject(with: data)) as? [String: Any],
                  let weightMap = json["weight_map"] as? [String: String]
            else { throw .invalidConfiguration(file: index.path, reason: "expected a JSON object with a \"weight_map\"") }
            files = Array(Set(weightMap.values)).sorted()
            var shardTensors: [String: [String: TensorView]] = [:]
            for name in files {
                guard !name.contains("/") else { throw .invalidConfiguration(file: index.path, reason: "shard name '\(name)' is not a plain file name") }
                shardTensors[name] = try SafeTensorsFile(path: directory.appendingPathComponent(name).path).tensors
            }
            for (tensor, shard) in weightMap {
                guard let view = shardTensors[shard]?[tensor] else {
                    throw .missingTensor(file: directory.appendingPathComponent(shard).path, tensor: tensor)
                }
                tensors[tensor] = view
            }
            return
        }
        let single = directory.appendingPathComponent("model.safetensors")
        if fileManager.fileExists(atPath: single.path) {
            files = ["model.safetensors"]
        } else {
            files = ((try? fileManager.contentsOfDirectory(atPath: directory.path)) ?? []).filter { $0.hasSuffix(".safetensors") }.sorted()
        }
        guard !files.isEmpty else { throw .unreadable(file: directory.path, reason: "no model.safetensors or *.safetensors files") }
        for name in files {
            for (tensor, view) in try SafeTensorsFile(path: directory.appendingPathComponent(name).path).tensors {
                tensors[tensor] = view
            }
        }
    }

    /// The tensor `name`, checked against `shape` when given.
    public func tensor(_ name: String, shape: [Int]? = nil) throws(CheckpointError) -> TensorView {
        guard let view = tensors[name] else { throw .missingTensor(file: directory.path, tensor: name) }
        if let shape, view.shape != shape {
            throw .wrongShape(file: view.file.path, tensor: name, expected: shape, found: view.shape)
        }
        return view
    }

    /// A linear weight `[outFeatures, inFeatures]` in its stored dtype: float, or q8 (an I8
    /// tensor of quants with its scales beside it, `Q8Checkpoint`).
    public func weight(_ name: String, shape: [Int]) throws(CheckpointError) -> WeightMatrix {
        if let view = tensors[name], view.dtype == .i8 { return try q8Weight(view, shape: shape) }
        return try tensor(name, shape: shape).weight()
    }

    /// The q8 weight whose quants are `view`, checked against `shape` `[out, in]`.
    func q8Weight(_ view: TensorView, shape: [Int]) throws(CheckpointError) -> WeightMatrix {
        guard view.quantization == Q8Checkpoint.format else {
            throw .invalidConfiguration(file: view.file.path, reason: "tensor '\(view.name)' is I8 but the file's metadata does not declare \(Q8Checkpoint.metadataKey) = \(Q8Checkpoint.format)")
        }
        guard shape.count == 2 else { throw .unsupportedDType(file: view.file.path, tensor: view.name, dtype: view.dtype.rawValue) }
        let (rows, columns) = (shape[0], shape[1]), blocks = Q8Layout.blocks(columns: columns)
        let quants = try tensor(view.name, shape: [rows, blocks * Q8Layout.blockSize])
        let scales = try tensor(Q8Checkpoint.scaleName(view.name), shape: [rows, blocks])
        guard scales.dtype == .f16 else {
            throw .unsupportedDType(file: scales.file.path, tensor: scales.name, dtype: scales.dtype.rawValue)
        }
        if let invalid = Q8Layout.firstInvalidQuant(quants.base.assumingMemoryBound(to: Int8.self), count: quants.elementCount) {
            throw .malformed(file: view.file.path, reason: "tensor '\(view.name)' holds the quant -128 at element \(invalid) (q8_0 quants lie in -127...127)")
        }
        return WeightMatrix(rows: rows, columns: columns, storageType: .q8, base: quants.base, scales: scales.base,
                            owner: Q8Storage(quants: quants.file, scales: scales.file))
    }

    /// A small tensor (norm weight, bias) widened to f32.
    public func floats(_ name: String, shape: [Int]) throws(CheckpointError) -> [Float] {
        try tensor(name, shape: shape).floats()
    }

    /// Whether a tensor exists.
    public func contains(_ name: String) -> Bool { tensors[name] != nil }
}
