import Foundation
import Numerics

/// How q8 weights are stored in safetensors (docs/CHECKPOINTS.md, "8-bit checkpoints"): a
/// linear weight `name` `[out, in]` becomes
/// - `name`: I8 `[out, blocks · 32]`, the quants (-127...127; the last block of a row padded
///   with zeros), and
/// - `name + "_scale"`: F16 `[out, blocks]`, one scale per block (`value = scale · quant`),
/// with `blocks = ceil(in / 32)`, and the file's `__metadata__` declares
/// `dllava_quantization = "q8_0/1"` (format q8_0, version 1). Readers reject other versions.
public enum Q8Checkpoint {
    public static let metadataKey = "dllava_quantization"
    public static let format = "q8_0/1"

    /// The name of the scales of the quantized weight `name`.
    public static func scaleName(_ name: String) -> String { name + "_scale" }
}

/// Keeps the files holding a q8 weight's quants and scales mapped.
final class Q8Storage: StorageOwner, @unchecked Sendable {
    let quants: MappedFile
    let scales: MappedFile

    init(quants: MappedFile, scales: MappedFile) {
        self.quants = quants
        self.scales = scales
    }
}

/// Writes one `.safetensors` file tensor by tensor, so that a model larger than memory can be
/// rewritten: the header is computed from the entries' shapes first, then each entry writes its
/// bytes in order.
public struct SafeTensorsWriter {
    public struct Entry {
        public let name: String
        public let dtype: TensorDType
        public let shape: [Int]
        /// Produces the tensor's bytes (exactly `shape` x `dtype` of them) when its turn comes.
        public let bytes: () throws -> Data

        public init(name: String, dtype: TensorDType, shape: [Int], bytes: @escaping () throws -> Data) {
            self.name = name
            self.dtype = dtype
            self.shape = shape
            self.bytes = bytes
        }

        var byteCount: Int { shape.reduce(1, *) * dtype.byteCount }
    }

    /// Writes `entries` (in the order given) and `metadata` to `url`, replacing what was there.
    /// Errors name the file (`CheckpointError.unwritable` for an I/O failure).
    public static func write(_ entries: [Entry], metadata: [String: String], to url: URL) throws {
        var header: [String: Any] = [:]
        if !metadata.isEmpty { header["__metadata__"] = metadata }
        var offset = 0
        for entry in entries {
            header[entry.name] = ["dtype": entry.dtype.rawValue, "shape": entry.shape, "data_offsets": [offset, offset + entry.byteCount]] as [String: Any]
            offset += entry.byteCount
        }
        var headerData = try JSONSerialization.data(withJSONObject: header, options: [.sortedKeys, .withoutEscapingSlashes])
        // The data starts 8-byte aligned, as the reference writer pads it.
        headerData.append(contentsOf: [UInt8](repeating: 0x20, count: (8 - headerData.count % 8) % 8))
        guard FileManager.default.createFile(atPath: url.path, contents: nil) else {
            throw CheckpointError.unwritable(file: url.path, reason: "cannot create the file")
        }
        do {
            let handle = try FileHandle(forWritingTo: url)
            defer { try? handle.close() }
            var length = UInt64(headerData.count).littleEndian
            try handle.write(contentsOf: Data(bytes: &length, count: 8))
            try handle.write(contentsOf: headerData)
            for entry in entries {
                let bytes = try entry.bytes()
                guard bytes.count == entry.byteCount else {
                    throw CheckpointError.malformed(file: url.path, reason: "tensor '\(entry.name)' produced \(bytes.count) bytes, its shape needs \(entry.byteCount)")
                }
                try handle.write(contentsOf: bytes)
            }
        } catch let error as CheckpointError {
            throw error
        } catch {
            throw CheckpointError.unwritable(file: url.path, reason: "\(error.localizedDescription)")
        }
    }
}
