// A request's generation state between two decode steps, and its binary encoding as snapshot
// frames: what a KV snapshot file holds (docs/FORMATS.md "KV snapshots"). Framing, encoding,
// checksums and the file itself are Artifacts' `SnapshotFile`; these are the payloads inside it.
import Foundation
import Llama
import Numerics

#if !(arch(x86_64) || arch(arm64))
#error("GenerationSnapshot writes arrays in memory order, which is little-endian only on these architectures")
#endif

/// Everything a request needs to go on generating exactly as if it had never stopped: its prompt
/// (to check it is the same request), its KV cells with their ORIGINAL positions, the tokens and
/// statistics so far, and its sampler's random state. Vision and prefill are never redone.
///
/// Only requests with a KV cache have one (without a cache the sequence is recomputed anyway).
/// Parity-test records (`stepLogits`, `gateLogits`, `keptGeneratedIndices`) are not kept.
public struct GenerationSnapshot: Sendable, Equatable {
    /// Version of the payload layout below; a change of layout is a new version, never an edit. (Version 1, one
    /// whole state per file, is no longer read: it only ever lay in snapshot files of format 2, which are refused.)
    public static let formatVersion: UInt32 = 2

    /// How K and V are stored: as the live cache holds them (f32, or bf16 at `--precision bf16`),
    /// never rounded further, so that resuming reproduces the uninterrupted run bit for bit.
    public enum StorageType: UInt32, Sendable {
        case float32 = 1
        case bfloat16 = 2

        init(_ type: Numerics.StorageType) {
            self = type == .bfloat16 ? .bfloat16 : .float32
        }

        var cacheType: Numerics.StorageType { self == .bfloat16 ? .bfloat16 : .float32 }
    }

    public var idsBeforeImage: [Int32]
    /// Tokens the image occupies in the unpruned prompt (its patch count), 0 without an image.
    public var imageTokens: Int
    public var idsAfterImage: [Int32]
    public var parameters: GenerationParameters
    /// The request's sampler with its random stream where the run left it.
    public var sampler: Sampler
    /// Decode steps the request has run (over every attempt).
    public var decodeSteps: Int
    /// The request reached a stop rule (a final snapshot kept for reuse).
    public var finished: Bool
    /// Tokens generated so far (the last one not yet in the cache), text, finish reason,
    /// logprobs, kept image indices and statistics.
    public var result: GenerationResult
    /// Number of K (and of V) floats per cell.
    public var keyValueWidth: Int
    /// `[layers]`: the request's kept cells in each decoder layer, in cache order, with their
    /// original positions; keys and values `[cellCount, keyValueWidth]`.
    public var cells: [SequenceCells]

    public init(idsBeforeImage: [Int32], imageTokens: Int, idsAfterImage: [Int32], parameters: GenerationParameters, sampler: Sampler,
                decodeSteps: Int, finished: Bool, result: GenerationResult, keyValueWidth: Int, cells: [SequenceCells]) {
        self.idsBeforeImage = idsBeforeImage
        self.imageTokens = imageTokens
        self.idsAfterImage = idsAfterImage
        self.parameters = parameters
        self.sampler = sampler
        self.decodeSteps = decodeSteps
        self.finished = finished
        self.result = result
        self.keyValueWidth = keyValueWidth
        self.cells = cells
    }

    /// Tokens of the unpruned prompt (text | image | text).
    public var promptLength: Int { idsBeforeImage.count + imageTokens + idsAfterImage.count }

    /// The fields kept as JSON inside the binary payload.
    struct Description: Codable {
        var parameters: GenerationParameters
        var result: GenerationResult
    }

    /// A snapshot frame's payload and what the file records beside it.
    public struct Frame: Sendable, Equatable {
        /// Whether the frame holds every cell (and replaces everything before it) or only those added since the
        /// previous frame.
        public var isFull: Bool
        public var payload: Data
        /// Cells the frame carries, all layers together.
        public var cells: Int
        public var decodeSteps: Int
        /// Bytes of a full frame's payload for the same state: the state's live size.
        public var stateBytes: Int
    }

    /// A frame of this state whose cells are, in each layer `l`, those after the first `base[l]` (the cells the
    /// previous frame's state held); all of them when `base` is nil (a full frame). The payload, little-endian
    /// throughout, every field from the cells on 4-byte aligned (so a byte shuffle of 4-byte elements lines up
    /// with f32 K/V):
    ///
    /// ```
    /// u32 format version (2)            u32 storage type (1 = f32, 2 = bf16)
    /// u32 layers                        u32 keyValueWidth
    /// u64 decode steps                  u8  finished (0 or 1), 3 zero bytes
    /// u64 x4 sampler xoshiro256** state
    /// u32 n, i32 x n ids before the image
    /// u32 image tokens
    /// u32 n, i32 x n ids after the image
    /// u32 n, n bytes of JSON {"parameters", "result"} (sorted keys), zero bytes up to a multiple of 4
    /// per layer: u32 cells the layer held before this frame (0 in a full frame), u32 c cells in this frame,
    ///            i32 x c positions, c*width keys, c*width values (f32 or bf16, as the cache holds them)
    /// ```
    ///
    /// Everything but the cells is whole in every frame: the newest frame's tokens, sampler and steps are the state's.
    public func frame(after base: [Int]? = nil) -> Frame {
        precondition(base.map { $0.count == cells.count && zip($0, cells).allSatisfy { $0 <= $1.cellCount } } ?? true,
                     "a frame appends to fewer cells than the state holds")
        var writer = ByteWriter()
        writer.append(Self.formatVersion)
        let storage = cells.first?.storage ?? .float32
        writer.append(StorageType(storage).rawValue)
        writer.append(UInt32(cells.count))
        writer.append(UInt32(keyValueWidth))
        writer.append(UInt64(decodeSteps))
        writer.data.append(contentsOf: [finished ? 1 : 0, 0, 0, 0])
        for word in sampler.generator.state { writer.append(word) }
        writer.append(idsBeforeImage)
        writer.append(UInt32(imageTokens))
        writer.append(idsAfterImage)
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        // Numbers, strings and arrays always encode.
        let description = try! encoder.encode(Description(parameters: parameters, result: result))
        writer.append(UInt32(description.count))
        writer.data.append(description)
        writer.data.append(contentsOf: [UInt8](repeating: 0, count: (4 - description.count % 4) % 4))
        let rowBytes = keyValueWidth * storage.byteCount
        let stateBytes = writer.data.count + cells.reduce(0) { $0 + 8 + $1.cellCount * (4 + 2 * rowBytes) }
        var count = 0
        for (l, layer) in cells.enumerated() {
            let first = base?[l] ?? 0
            writer.append(UInt32(first))
            writer.append(layer.positions[first...])
            writer.data.append(contentsOf: layer.keys[(first * rowBytes)...])
            writer.data.append(contentsOf: layer.values[(first * rowBytes)...])
            count += layer.cellCount - first
        }
        return Frame(isFull: base == nil, payload: writer.data, cells: count, decodeSteps: decodeSteps, stateBytes: stateBytes)
    }

    /// What the frames of a request's snapshot can hold on a model with `layers` decoder layers of K/V width
    /// `keyValueWidth` and a context of `contextLength` tokens, K/V stored as `storage`: at most `maxCells` cells (all
    /// layers together) of `cellBytes` each (a position, then a key and a value row), and `otherBytes` of everything
    /// else in one frame: the fixed fields (72 bytes), the prompt's ids (4 bytes a token), 8 bytes per layer, and the
    /// parameters and result JSON (64 KiB, plus 2 KiB per token of context for the text, ids, log-probabilities and
    /// kept indices each token adds). Readers refuse frames that declare more. Each dimension is taken as at most
    /// 2^24 (a configuration can say anything), so the products never overflow.
    public static func bounds(layers: Int, keyValueWidth: Int, contextLength: Int,
                              storage: Numerics.StorageType) -> (maxCells: Int, cellBytes: Int, otherBytes: Int) {
        let (layers, width, context) = (min(max(layers, 0), 1 << 24), min(max(keyValueWidth, 0), 1 << 24), min(max(contextLength, 0), 1 << 24))
        return (layers * context, 4 + 2 * width * StorageType(storage).cacheType.byteCount,
                72 + 4 * context + 8 * layers + (64 << 10) + (2 << 10) * context)
    }

    /// The state a snapshot's frames make: `payloads[0]` a full frame's payload, each later one an append frame's,
    /// each checked (version, storage type, every length, and that it appends to the cells the frames before it
    /// left). Everything but the cells is the last frame's.
    public init(frames payloads: [Data]) throws(SnapshotFormatError) {
        guard !payloads.isEmpty else { throw .malformed("there is no frame") }
        var cells: [SequenceCells] = []
        var newest: GenerationSnapshot?
        for (index, payload) in payloads.enumerated() {
            var reader = ByteReader(data: payload)
            var state = try Self(readingStateFrom: &reader)
            if let newest, cells.count != state.cells.count || newest.keyValueWidth != state.keyValueWidth
                || cells.first?.storage != state.cells.first?.storage {
                throw .malformed("frame \(index + 1) has \(state.cells.count) layers of width \(state.keyValueWidth) (\(state.cells.first?.storage.rawValue ?? "-")), the first \(cells.count) of width \(newest.keyValueWidth) (\(cells.first?.storage.rawValue ?? "-"))")
            }
            if index == 0 { cells = state.cells }
            for l in cells.indices {
                let base = Int(try reader.read() as UInt32)
                guard base == cells[l].cellCount else {
                    throw .malformed("frame \(index + 1) appends to \(base) cells of layer \(l), the frames before it hold \(cells[l].cellCount)")
                }
                let positions = try reader.readInt32Array()
                let (bytes, overflow) = positions.count.multipliedReportingOverflow(by: state.keyValueWidth * cells[l].storage.byteCount)
                guard !overflow else { throw .malformed("\(positions.count) cells of width \(state.keyValueWidth) cannot fit in \(reader.data.count) bytes") }
                cells[l].append(positions: positions, storedKeys: try reader.readBytes(bytes), storedValues: try reader.readBytes(bytes))
            }
            guard reader.offset == reader.data.count else { throw .malformed("\(reader.data.count - reader.offset) bytes follow the last layer of frame \(index + 1)") }
            state.cells = []
            newest = state
        }
        self = newest!
        self.cells = cells
    }

    /// Reads the part of a frame before its cells; `cells` is `[layers]` empty layers.
    private init(readingStateFrom reader: inout ByteReader) throws(SnapshotFormatError) {
        let data = reader.data
        let version: UInt32 = try reader.read()
        guard version == Self.formatVersion else { throw .unsupportedVersion(found: version, supported: Self.formatVersion) }
        let storageValue: UInt32 = try reader.read()
        guard let storage = StorageType(rawValue: storageValue)?.cacheType else { throw .unsupportedStorageType(storageValue) }
        let layers = Int(try reader.read() as UInt32)
        keyValueWidth = Int(try reader.read() as UInt32)
        // Bounds that keep the counts below from overflowing on a damaged payload.
        guard layers <= data.count, keyValueWidth <= data.count else {
            throw .malformed("\(layers) layers of width \(keyValueWidth) cannot fit in \(data.count) bytes")
        }
        let steps: UInt64 = try reader.read()
        guard let decodeSteps = Int(exactly: steps) else { throw .malformed("\(steps) decode steps") }
        self.decodeSteps = decodeSteps
        let flags = try reader.readBytes(4)
        guard flags[0] <= 1, flags.dropFirst().allSatisfy({ $0 == 0 }) else { throw .malformed("the finished flag is \(Array(flags))") }
        finished = flags[0] == 1
        var state: [UInt64] = []
        for _ in 0..<4 { state.append(try reader.read()) }
        idsBeforeImage = try reader.readInt32Array()
        imageTokens = Int(try reader.read() as UInt32)
        idsAfterImage = try reader.readInt32Array()
        let length = Int(try reader.read() as UInt32)
        let description: Description
        do {
            description = try JSONDecoder().decode(Description.self, from: try reader.readBytes(length))
        } catch let error as SnapshotFormatError {
            throw error
        } catch {
            throw .malformed("the parameters and result are not valid JSON")
        }
        guard try reader.readBytes((4 - length % 4) % 4).allSatisfy({ $0 == 0 }) else { throw .malformed("the padding after the JSON is not zero") }
        parameters = description.parameters
        result = description.result
        sampler = Sampler(parameters.sampling)
        sampler.generator.state = state
        cells = Array(repeating: SequenceCells(storage: storage), count: layers)
    }
}

/// Why a snapshot payload cannot be decoded. The caller names the file.
public enum SnapshotFormatError: Error, Equatable, CustomStringConvertible {
    case unsupportedVersion(found: UInt32, supported: UInt32)
    case unsupportedStorageType(UInt32)
    /// The payload ends `needed` bytes short at `offset`.
    case truncated(offset: Int, needed: Int)
    case malformed(String)

    public var description: String {
        switch self {
        case let .unsupportedVersion(found, supported):
            return "the generation state is format version \(found); this build reads version \(supported)"
        case let .unsupportedStorageType(type): return "the K/V storage type \(type) is unknown (1 = f32, 2 = bf16)"
        case let .truncated(offset, needed): return "the generation state ends at byte \(offset), \(needed) bytes short"
        case let .malformed(reason): return "the generation state is malformed: \(reason)"
        }
    }
}

/// Appends little-endian values. Arrays are copied as they lie in memory, which is their
/// little-endian form on every platform this package builds for.
struct ByteWriter {
    var data = Data()

    mutating func append<T: FixedWidthInteger>(_ value: T) {
        withUnsafeBytes(of: value.littleEndian) { data.append(contentsOf: $0) }
    }

    /// A u32 count, then the values.
    mutating func append(_ values: [Int32]) {
        append(values[...])
    }

    /// A u32 count, then the values.
    mutating func append(_ values: ArraySlice<Int32>) {
        append(UInt32(values.count))
        values.withUnsafeBytes { data.append(contentsOf: $0) }
    }
}

/// Reads little-endian values, throwing `truncated` instead of reading past the end.
struct ByteReader {
    let data: Data
    var offset = 0

    init(data: Data) {
        // Index from 0 whatever slice we were given.
        self.data = Data(data)
    }

    mutating func readBytes(_ count: Int) throws(SnapshotFormatError) -> Data {
        guard count >= 0, data.count - offset >= count else { throw .truncated(offset: data.count, needed: count - (data.count - offset)) }
        defer { offset += count }
        return data.subdata(in: offset ..< offset + count)
    }

    mutating func read<T: FixedWidthInteger>() throws(SnapshotFormatError) -> T {
        let size = MemoryLayout<T>.size
        guard data.count - offset >= size else { throw .truncated(offset: data.count, needed: size - (data.count - offset)) }
        var value = T.zero
        withUnsafeMutableBytes(of: &value) { destination in
            data.withUnsafeBytes { destination.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[offset ..< offset + size])) }
        }
        offset += size
        return T(littleEndian: value)
    }

    mutating func readInt32Array() throws(SnapshotFormatError) -> [Int32] {
        try readArray(count: Int(try read() as UInt32), of: Int32.self)
    }

    /// `count` 4-byte values as they lie in the payload (little-endian, like memory; see `ByteWriter`).
    mutating func readArray<T: BitwiseCopyable>(count: Int, of _: T.Type) throws(SnapshotFormatError) -> [T] {
        let stride = MemoryLayout<T>.stride
        guard count <= (data.count - offset) / stride else {
            throw .truncated(offset: data.count, needed: (count - (data.count - offset) / stride).multipliedReportingOverflow(by: stride).partialValue)
        }
        let bytes = try readBytes(count * stride)
        return [T](unsafeUninitializedCapacity: count) { buffer, initialized in
            bytes.withUnsafeBytes { UnsafeMutableRawBufferPointer(buffer).copyMemory(from: $0) }
            initialized = count
        }
    }
}

// The conversion between a batch row and its snapshot.
extension Generator {
    /// Checks that `snapshot` is `request`'s state on this model: the same prompt and parameters,
    /// and a cache of this model's shape.
    public func checkSnapshot(_ snapshot: GenerationSnapshot, fits request: GenerationRequest, request r: Int) throws(GenerationError) {
        let c = model.language.configuration
        let imageTokens = request.pixelValues == nil ? 0 : model.vision.configuration.patchCount
        let problems: [(Bool, String)] = [
            (snapshot.cells.count == c.hiddenLayers, "it has \(snapshot.cells.count) layers, the model \(c.hiddenLayers)"),
            (snapshot.keyValueWidth == c.keyValueWidth, "its K/V width is \(snapshot.keyValueWidth), the model's \(c.keyValueWidth)"),
            (snapshot.idsBeforeImage == request.idsBeforeImage && snapshot.idsAfterImage == request.idsAfterImage
                && snapshot.imageTokens == imageTokens, "its prompt differs"),
            (snapshot.parameters == request.parameters, "its generation parameters differ"),
            (snapshot.cells.allSatisfy { $0.storage == KeyValueCache.storage(for: Kernels.precision) },
             "its K/V are stored as \(snapshot.cells.first?.storage.rawValue ?? "-"), this run keeps \(KeyValueCache.storage(for: Kernels.precision).rawValue)"),
            (snapshot.result.stats.precision == Kernels.precision,
             "it was computed at \(snapshot.result.stats.precision?.rawValue ?? "an unrecorded") precision, this run uses \(Kernels.precision.rawValue)"),
            (request.parameters.sparsity.usesKeyValueCache, "the request runs without a KV cache"),
            (!snapshot.result.tokenIDs.isEmpty, "it has no generated token"),
            (request.generatedPrefix.isEmpty, "the request also replays a generated prefix"),
            (snapshot.result.tokenIDs.allSatisfy { $0 >= 0 && Int($0) < c.vocabularySize }, "a generated token lies outside the vocabulary"),
            (snapshot.promptLength + snapshot.result.tokenIDs.count <= c.maxPositionEmbeddings, "its sequence is longer than the context"),
            // The newest generated token is fed at the next step, so no cell may hold it yet.
            (snapshot.cells.allSatisfy { $0.positions.allSatisfy { $0 >= 0 && Int($0) < snapshot.promptLength + snapshot.result.tokenIDs.count - 1 } },
             "a cell's position lies outside the sequence"),
        ]
        if let (_, reason) = problems.first(where: { !$0.0 }) { throw .snapshotMismatch(request: r, reason: reason) }
    }

    /// A request's state restored from its snapshot, its cells installed as sequence `r`.
    func resumedState(_ request: GenerationRequest, from snapshot: GenerationSnapshot, sequence r: Int,
                      cache: inout KeyValueCache) -> RequestState {
        for l in cache.layers.indices { cache.layers[l][r] = snapshot.cells[l] }
        let imageStart = snapshot.idsBeforeImage.count
        var state = RequestState(request: request, sequence: r, sampler: snapshot.sampler, promptEmbeddings: nil,
                                 promptLength: snapshot.promptLength,
                                 imageSpan: snapshot.imageTokens == 0 ? nil : imageStart ..< imageStart + snapshot.imageTokens)
        state.result = snapshot.result
        state.finished = snapshot.finished
        state.decodeSteps = snapshot.decodeSteps
        return state
    }

    /// The state of a request with a KV cache, as a snapshot.
    func snapshot(of state: RequestState, cache: KeyValueCache) -> GenerationSnapshot {
        var result = state.result
        result.stepLogits = []
        result.gateLogits = []
        result.keptGeneratedIndices = []
        return GenerationSnapshot(idsBeforeImage: state.request.idsBeforeImage, imageTokens: state.imageSpan?.count ?? 0,
                                  idsAfterImage: state.request.idsAfterImage, parameters: state.parameters, sampler: state.sampler,
                                  decodeSteps: state.decodeSteps, finished: state.finished, result: result,
                                  keyValueWidth: cache.keyValueWidth, cells: cache.layers.map { $0[state.sequence] })
    }
}
