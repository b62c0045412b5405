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

    /// Maps the regular file at `path`; opened without blocking, so a FIFO named like a checkpoint is refused
    /// rather than waited on.
    public init(path: String) throws(CheckpointError) {
        self.path = path
        let descriptor = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC)
        guard descriptor >= 0 else { throw .unreadable(file: path, reason: String(cString: strerror(errno))) }
        defer { close(descriptor) }
        var status = stat()
        guard fstat(descriptor, &status) == 0 else { throw .unreadable(file: path, reason: String(cString: strerror(errno))) }
        guard status.st_mode & S_IFMT == S_IFREG else { throw .unreadable(file: path, reason: "not a regular file") }
        guard let size = Int(exactly: status.st_size) else { throw .unreadable(file: path, reason: "its size \(status.st_size) is out of range") }
        byteCount = size
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
///
/// Every number in the file is untrusted: the header length is bounded (`maxHeaderBytes`, the format's own
/// cap) before it is converted, shapes are multiplied with overflow checks and bounded (`maxTensorBytes`), and
/// offsets must lie inside the data with begin <= end; any violation is `CheckpointError.malformed` naming the
/// file (exit 65), never a trap.
public struct SafeTensorsFile: Sendable {
    public let file: MappedFile
    public let tensors: [String: TensorView]
    public let metadata: [String: String]

    /// The largest header the format allows (the reference reader's `MAX_HEADER_SIZE`, 100 MB).
    public static let maxHeaderBytes = 100_000_000
    /// The largest tensor, in bytes, a shape may describe, zero dimensions counted as one: far above any model's
    /// tensor, and low enough that no arithmetic on a shape's dimensions (rows times padded blocks, ...) overflows.
    public static let maxTensorBytes = 1 << 48

    public init(path: String) throws(CheckpointError) {
        let file = try MappedFile(path: path)
        self.file = file
        guard file.byteCount >= 8 else { throw .malformed(file: path, reason: "shorter than the 8-byte header length") }
        let declaredLength = UInt64(littleEndian: file.base.loadUnaligned(as: UInt64.self))
        guard declaredLength > 0, declaredLength <= UInt64(Self.maxHeaderBytes) else {
            throw .malformed(file: path, reason: "header length \(declaredLength) is not in 1...\(Self.maxHeaderBytes) (the format's limit)")
        }
        let headerLength = Int(declaredLength)
        guard headerLength <= file.byteCount - 8 else {
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
            guard let extent = Self.byteExtent(shape: shape, elementBytes: dtype.byteCount) else {
                throw .malformed(file: path, reason: "tensor '\(name)' has shape \(shape), larger than \(Self.maxTensorBytes) bytes of \(dtypeName)")
            }
            let bytes = shape.contains(0) ? 0 : extent
            guard bytes == end - begin else {
                throw .malformed(file: path, reason: "tensor '\(name)' has \(end - begin) bytes, but shape \(shape) of \(dtypeName) needs \(bytes)")
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

    /// The bytes `shape` of `elementBytes`-byte elements spans with every zero dimension counted as one, nil when
    /// that overflows or exceeds `maxTensorBytes` (a bound on every product of the dimensions).
    static func byteExtent(shape: [Int], elementBytes: Int) -> Int? {
        var product = elementBytes
        for dimension in shape {
            let (next, overflow) = product.multipliedReportingOverflow(by: max(dimension, 1))
            guard !overflow, next <= maxTensorBytes else { return nil }
            product = next
        }
        return product
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
            let weightMap = try Self.readIndex(index).weightMap
            files = Array(Set(weightMap.values)).sorted()
            var shardTensors: [String: [String: TensorView]] = [:]
            for name in files {
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

    /// The largest `model.safetensors.index.json` read (a real one is tens of kilobytes).
    public static let maxIndexBytes = SafeTensorsFile.maxHeaderBytes

    /// A sharded checkpoint's index: the JSON object and its `weight_map` (tensor -> shard file). Refused
    /// (`invalidConfiguration`, naming the file) when it is not a regular file of at most `maxIndexBytes`, not a
    /// JSON object with a string-to-string `weight_map`, or a shard is not a plain file name in the same directory.
    public static func readIndex(_ url: URL) throws(CheckpointError) -> (weightMap: [String: String], object: [String: Any]) {
        let data: Data
        do {
            let handle = try FileHandle(forReadingFrom: url)
            defer { try? handle.close() }
            var status = stat()
            guard fstat(handle.fileDescriptor, &status) == 0, status.st_mode & S_IFMT == S_IFREG else {
                throw CheckpointError.unreadable(file: url.path, reason: "not a regular file")
            }
            guard status.st_size <= maxIndexBytes else {
                throw CheckpointError.invalidConfiguration(file: url.path, reason: "\(status.st_size) bytes, more than an index may have (\(maxIndexBytes))")
            }
            data = try handle.readToEnd() ?? Data()
        } catch let error as CheckpointError {
            throw error
        } catch {
            throw .unreadable(file: url.path, reason: error.localizedDescription)
        }
        guard let object = (try? JSONSerialization.jsonObject(with: data)) as? [String: Any],
              let weightMap = object["weight_map"] as? [String: String]
        else { throw .invalidConfiguration(file: url.path, reason: "expected a JSON object with a \"weight_map\" of tensor names to file names") }
        for name in Set(weightMap.values) where name.isEmpty || name.contains("/") || name == "." || name == ".." || name.contains("\0") {
            throw .invalidConfiguration(file: url.path, reason: "shard name '\(name)' is not a plain file name")
        }
        return (weightMap, object)
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
        let (rows, columns) = (shape[0], shape[1])
        // The expected shape comes from the configuration: keep its arithmetic from overflowing.
        guard rows >= 0, columns >= 0, columns <= SafeTensorsFile.maxTensorBytes, SafeTensorsFile.byteExtent(shape: [rows, columns + Q8Layout.blockSize], elementBytes: 1) != nil else {
            throw .wrongShape(file: view.file.path, tensor: view.name, expected: shape, found: view.shape)
        }
        let blocks = Q8Layout.blocks(columns: columns)
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
