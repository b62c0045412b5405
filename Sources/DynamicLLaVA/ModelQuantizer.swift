// `dllava quantize`: an 8-bit copy of a model directory (docs/CHECKPOINTS.md, "8-bit checkpoints").
import Foundation
import Numerics
import SafeTensors

/// The weight formats `dllava quantize` writes.
public enum QuantizationType: String, Sendable, CaseIterable {
    /// q8_0: int8 quants with an f16 scale per block of 32 (`Q8Checkpoint`).
    case q8
}

/// Writes a complete model directory whose LLM and vision-tower linear weights are q8; every
/// other tensor (embeddings, norms, biases, projector, predictors, LM head, patch embedding) is
/// copied as stored. config.json gains a `dllava_quantization` record and keeps everything else
/// (`sparse_config` included); in the original layout the vision tower is written to a
/// subdirectory named as the source tower's directory and `mm_vision_tower` names it.
public enum ModelQuantizer {
    /// What one run wrote.
    public struct Summary: Sendable {
        public var quantizedTensors = 0
        public var copiedTensors = 0
        public var bytesBefore = 0
        public var bytesAfter = 0
    }

    /// The config.json field that records the quantization.
    public static let configurationKey = "dllava_quantization"

    /// Whether `name` is a linear weight of a LLaMA decoder layer (`layers.N.self_attn.{q,k,v,o}_proj`,
    /// `layers.N.mlp.{gate,up,down}_proj`) or of a CLIP encoder layer (`encoder.layers.N.self_attn.{q,k,v,out}_proj`,
    /// `encoder.layers.N.mlp.fc{1,2}`), the weights `quantize` turns into q8.
    public static func isQuantized(_ name: String) -> Bool {
        let parts = name.split(separator: ".").map(String.init)
        guard parts.last == "weight", let layers = parts.lastIndex(of: "layers"), layers + 5 == parts.count,
              Int(parts[layers + 1]) != nil else { return false }
        let module = parts[layers + 2] + "." + parts[layers + 3]
        let decoder = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
        let encoder = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"]
        let inEncoder = layers > 0 && parts[layers - 1] == "encoder"
        return inEncoder ? encoder.contains(module) : decoder.contains(module)
    }

    /// Quantizes the model in `model` into `output` (which must not exist, or be empty).
    public static func quantize(model: URL, output: URL, type: QuantizationType) throws -> Summary {
        let fileManager = FileManager.default
        let configURL = model.appendingPathComponent("config.json")
        let data = try LLaVAModel.readJSON(configURL)
        guard var configuration = (try? JSONSerialization.jsonObject(with: data)) as? [String: Any] else {
            throw CheckpointError.invalidConfiguration(file: configURL.path, reason: "not a JSON object")
        }
        if let existing = configuration[configurationKey] {
            throw CheckpointError.invalidConfiguration(file: configURL.path, reason: "the model is already quantized (\(configurationKey): \(existing))")
        }
        if let contents = try? fileManager.contentsOfDirectory(atPath: output.path), !contents.isEmpty {
            throw CheckpointError.unwritable(file: output.path, reason: "the output directory exists and is not empty")
        }
        try createDirectory(output)

        var summary = Summary()
        let record: [String: Any] = ["format": Q8Checkpoint.format, "type": type.rawValue, "block_size": Q8Layout.blockSize,
                                     "scale_dtype": "F16", "quantized": "LLM and vision tower linear weights",
                                     "source": model.standardizedFileURL.lastPathComponent]
        configuration[configurationKey] = record
        let isOriginalLayout = configuration["text_config"] == nil && configuration["model_type"] as? String != "llava"
            && configuration["mm_vision_tower"] != nil
        if isOriginalLayout {
            let layout = try LLaVAModel.decode(OriginalLayoutConfiguration.self, from: data, file: configURL)
            let tower = try LLaVAModel.resolveVisionTower(layout.visionTower, modelDirectory: model, configURL: configURL)
            let towerOutput = output.appendingPathComponent(tower.lastPathComponent)
            try createDirectory(towerOutput)
            try rewriteTensors(from: tower, to: towerOutput, summary: &summary)
            try copyOtherFiles(from: tower, to: towerOutput, quantizationRecord: record)
            configuration["mm_vision_tower"] = tower.lastPathComponent
        }
        try rewriteTensors(from: model, to: output, summary: &summary)
        try copyOtherFiles(from: model, to: output, quantizationRecord: nil)
        try writeJSON(configuration, to: output.appendingPathComponent("config.json"))
        return summary
    }

    static func createDirectory(_ url: URL) throws(CheckpointError) {
        do {
            try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        } catch {
            throw .unwritable(file: url.path, reason: error.localizedDescription)
        }
    }

    static func writeJSON(_ object: [String: Any], to url: URL) throws(CheckpointError) {
        do {
            let data = try JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes])
            try data.write(to: url)
        } catch {
            throw .unwritable(file: url.path, reason: error.localizedDescription)
        }
    }

    /// The safetensors files of a directory as `Checkpoint` finds them: the index's shards,
    /// `model.safetensors`, or every `*.safetensors`.
    static func tensorFiles(in directory: URL) throws(CheckpointError) -> (files: [String], index: [String: Any]?) {
        let indexURL = directory.appendingPathComponent("model.safetensors.index.json")
        if FileManager.default.fileExists(atPath: indexURL.path) {
            let (weightMap, index) = try Checkpoint.readIndex(indexURL)
            return (Array(Set(weightMap.values)).sorted(), index)
        }
        if FileManager.default.fileExists(atPath: directory.appendingPathComponent("model.safetensors").path) {
            return (["model.safetensors"], nil)
        }
        let files = ((try? FileManager.default.contentsOfDirectory(atPath: directory.path)) ?? []).filter { $0.hasSuffix(".safetensors") }.sorted()
        guard !files.isEmpty else { throw .unreadable(file: directory.path, reason: "no model.safetensors or *.safetensors files") }
        return (files, nil)
    }

    /// Rewrites every safetensors file of `source` into `destination`, quantizing the tensors
    /// `isQuantized` names (and the index, with each scale in its weight's shard).
    static func rewriteTensors(from source: URL, to destination: URL, summary: inout Summary) throws {
        let (files, index) = try tensorFiles(in: source)
        var addedToIndex: [String: String] = [:]
        for name in files {
            let file = try SafeTensorsFile(path: source.appendingPathComponent(name).path)
            var entries: [SafeTensorsWriter.Entry] = []
            var quantizedAny = false
            for tensorName in file.tensors.keys.sorted() {
                let view = file.tensors[tensorName]!
                summary.bytesBefore += view.byteCount
                guard isQuantized(tensorName), view.shape.count == 2, [.f32, .f16, .bf16].contains(view.dtype) else {
                    entries.append(SafeTensorsWriter.Entry(name: tensorName, dtype: view.dtype, shape: view.shape) {
                        Data(bytesNoCopy: UnsafeMutableRawPointer(mutating: view.base), count: view.byteCount, deallocator: .none)
                    })
                    summary.copiedTensors += 1
                    summary.bytesAfter += view.byteCount
                    continue
                }
                quantizedAny = true
                summary.quantizedTensors += 1
                let (rows, columns) = (view.shape[0], view.shape[1]), blocks = Q8Layout.blocks(columns: columns)
                summary.bytesAfter += rows * blocks * (Q8Layout.blockSize + 2)
                // The quants' entry quantizes; the scales' entry, written next, reads the same result.
                let quantized = QuantizedTensor()
                entries.append(SafeTensorsWriter.Entry(name: tensorName, dtype: .i8, shape: [rows, blocks * Q8Layout.blockSize]) {
                    guard let weight = try view.weight().quantizedQ8() else {
                        throw CheckpointError.malformed(file: view.file.path, reason: "tensor '\(tensorName)' holds a value that is not finite or too large for an f16 block scale")
                    }
                    quantized.weight = weight
                    return Data(bytes: weight.base, count: rows * blocks * Q8Layout.blockSize)
                })
                entries.append(SafeTensorsWriter.Entry(name: Q8Checkpoint.scaleName(tensorName), dtype: .f16, shape: [rows, blocks]) {
                    defer { quantized.weight = nil }
                    return Data(bytes: quantized.weight!.scales!, count: rows * blocks * 2)
                })
                addedToIndex[Q8Checkpoint.scaleName(tensorName)] = name
            }
            var metadata = file.metadata
            if quantizedAny { metadata[Q8Checkpoint.metadataKey] = Q8Checkpoint.format }
            try SafeTensorsWriter.write(entries, metadata: metadata, to: destination.appendingPathComponent(name))
        }
        if var index {
            var weightMap = index["weight_map"] as? [String: String] ?? [:]
            weightMap.merge(addedToIndex) { current, _ in current }
            index["weight_map"] = weightMap
            try writeJSON(index, to: destination.appendingPathComponent("model.safetensors.index.json"))
        }
    }

    /// Copies the regular files of `source` other than its tensors, index and (unless
    /// `quantizationRecord` is given, then with it added) config.json.
    static func copyOtherFiles(from source: URL, to destination: URL, quantizationRecord: [String: Any]?) throws {
        let fileManager = FileManager.default
        let names: [String]
        do {
            names = try fileManager.contentsOfDirectory(atPath: source.path).sorted()
        } catch {
            throw CheckpointError.unreadable(file: source.path, reason: error.localizedDescription)
        }
        for name in names where !name.hasSuffix(".safetensors") && name != "model.safetensors.index.json" {
            let from = source.appendingPathComponent(name), to = destination.appendingPathComponent(name)
            var isDirectory: ObjCBool = false
            guard fileManager.fileExists(atPath: from.path, isDirectory: &isDirectory), !isDirectory.boolValue else { continue }
            if name == "config.json" {
                guard let quantizationRecord else { continue }
                let data = try LLaVAModel.readJSON(from)
                guard var object = (try? JSONSerialization.jsonObject(with: data)) as? [String: Any] else {
                    throw CheckpointError.invalidConfiguration(file: from.path, reason: "not a JSON object")
                }
                object[configurationKey] = quantizationRecord
                try writeJSON(object, to: to)
                continue
            }
            do {
                try fileManager.copyItem(at: from, to: to)
            } catch {
                throw CheckpointError.unwritable(file: to.path, reason: error.localizedDescription)
            }
        }
    }
}

/// Hands one quantized weight from its quants' entry to its scales' entry.
private final class QuantizedTensor {
    var weight: WeightMatrix?
}
