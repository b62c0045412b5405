// Loading a LLaVA-1.5 checkpoint in either layout (docs/CHECKPOINTS.md) and turning
// images into the embeddings the language model reads.
import Foundation
import Llama
import Numerics
import SafeTensors
import Sparsification
import Vision

/// Which of the two supported directory layouts a checkpoint uses.
public enum CheckpointLayout: String, Sendable, Codable {
    /// Original LLaVA / Dynamic-LLaVA: `model_type: llava_llama`, `model.mm_projector.*`, a
    /// separate CLIPVisionModel directory named by `mm_vision_tower`.
    case original
    /// llava-hf `LlavaForConditionalGeneration`: one directory, `text_config` / `vision_config`.
    case llavaHF = "llava-hf"
}

/// How the model's images are prepared: read from the checkpoint, as its reference pipeline does.
public struct ImagePreprocessing: Sendable, Equatable {
    /// LLaVA's `expand2square` before CLIP's processor: the original layout's
    /// `image_aspect_ratio == "pad"` (LLaVA-1.5), or llava-hf's `do_pad`.
    public var padToSquare: Bool
    /// `image_mean` / `image_std` of preprocessor_config.json, when the checkpoint has one.
    public var mean: [Double]?
    public var std: [Double]?

    public init(padToSquare: Bool, mean: [Double]? = nil, std: [Double]? = nil) {
        self.padToSquare = padToSquare
        self.mean = mean
        self.std = std
    }

    /// Reads `image_mean`, `image_std` and `do_pad` from a preprocessor_config.json if it exists.
    static func read(_ url: URL, padToSquare: Bool?) -> ImagePreprocessing {
        let object = FileManager.default.contents(atPath: url.path)
            .flatMap { try? JSONSerialization.jsonObject(with: $0) as? [String: Any] } ?? [:]
        return ImagePreprocessing(padToSquare: padToSquare ?? (object["do_pad"] as? Bool ?? false),
                                  mean: object["image_mean"] as? [Double], std: object["image_std"] as? [Double])
    }
}

/// Dynamic-LLaVA's predictors as loaded from a checkpoint with a `sparse_config`. A missing
/// predictor tensor is kept as its error and reported only when sparsity is requested, so the
/// same checkpoint still runs with full context.
public struct SparseModules: Sendable {
    public let configuration: SparseConfiguration
    public let imagePredictor: Result<ImagePredictor, CheckpointError>
    public let outputTextPredictor: Result<OutputTextPredictor, CheckpointError>

    public init(configuration: SparseConfiguration, imagePredictor: Result<ImagePredictor, CheckpointError>,
                outputTextPredictor: Result<OutputTextPredictor, CheckpointError>) {
        self.configuration = configuration
        self.imagePredictor = imagePredictor
        self.outputTextPredictor = outputTextPredictor
    }
}

/// Fields of the original layout's config.json beyond the LLaMA ones.
struct OriginalLayoutConfiguration: Decodable {
    var modelType: String
    var visionTower: String
    var visionSelectLayer: Int
    var visionSelectFeature: String
    var projectorType: String
    var multimodalHiddenSize: Int?
    var imageAspectRatio: String?
    var sparseConfiguration: SparseConfiguration?

    enum CodingKeys: String, CodingKey {
        case modelType = "model_type", visionTower = "mm_vision_tower", visionSelectLayer = "mm_vision_select_layer"
        case visionSelectFeature = "mm_vision_select_feature", projectorType = "mm_projector_type"
        case multimodalHiddenSize = "mm_hidden_size", imageAspectRatio = "image_aspect_ratio"
        case sparseConfiguration = "sparse_config"
    }

    init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        modelType = try c.decode(String.self, forKey: .modelType)
        visionTower = try c.decode(String.self, forKey: .visionTower)
        visionSelectLayer = try c.decodeIfPresent(Int.self, forKey: .visionSelectLayer) ?? -2
        visionSelectFeature = try c.decodeIfPresent(String.self, forKey: .visionSelectFeature) ?? "patch"
        projectorType = try c.decodeIfPresent(String.self, forKey: .projectorType) ?? "linear"
        multimodalHiddenSize = try c.decodeIfPresent(Int.self, forKey: .multimodalHiddenSize)
        imageAspectRatio = try c.decodeIfPresent(String.self, forKey: .imageAspectRatio)
        sparseConfiguration = try c.decodeIfPresent(SparseConfiguration.self, forKey: .sparseConfiguration)
    }
}

/// The llava-hf layout's config.json.
struct HFLayoutConfiguration: Decodable {
    var textConfiguration: LlamaConfiguration
    var visionConfiguration: CLIPVisionConfiguration
    var visionFeatureLayer: Int
    var visionFeatureSelectStrategy: String
    var projectorActivation: String
    var projectorBias: Bool

    enum CodingKeys: String, CodingKey {
        case textConfiguration = "text_config", visionConfiguration = "vision_config"
        case visionFeatureLayer = "vision_feature_layer", visionFeatureSelectStrategy = "vision_feature_select_strategy"
        case projectorActivation = "projector_hidden_act", projectorBias = "multimodal_projector_bias"
    }

    init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        textConfiguration = try c.decodeIfPresent(LlamaConfiguration.self, forKey: .textConfiguration) ?? LlamaConfiguration()
        visionConfiguration = try c.decodeIfPresent(CLIPVisionConfiguration.self, forKey: .visionConfiguration) ?? CLIPVisionConfiguration()
        visionFeatureLayer = try c.decodeIfPresent(Int.self, forKey: .visionFeatureLayer) ?? -2
        visionFeatureSelectStrategy = try c.decodeIfPresent(String.self, forKey: .visionFeatureSelectStrategy) ?? "default"
        projectorActivation = try c.decodeIfPresent(String.self, forKey: .projectorActivation) ?? "gelu"
        projectorBias = try c.decodeIfPresent(Bool.self, forKey: .projectorBias) ?? true
    }
}

/// A loaded LLaVA-1.5 model: CLIP tower, projector and LLaMA decoder.
public struct LLaVAModel: Sendable {
    public let directory: URL
    public let layout: CheckpointLayout
    public let vision: CLIPVisionTower
    public let projector: MultimodalProjector
    public let language: LlamaModel
    /// `eos_token_id` from config.json (top level or `text_config`), when it names one.
    public let endOfSequenceTokenID: Int32?
    public let imagePreprocessing: ImagePreprocessing
    /// The predictors of a Dynamic-LLaVA checkpoint (nil: no `sparse_config`).
    public let sparse: SparseModules?
    /// The CLIP checkpoint directory the original layout names with `mm_vision_tower` (nil in the llava-hf layout,
    /// whose tower lives in `directory`): the files a model fingerprint must cover lie in both.
    public let visionTowerDirectory: URL?

    public init(vision: CLIPVisionTower, projector: MultimodalProjector, language: LlamaModel, directory: URL,
                layout: CheckpointLayout, endOfSequenceTokenID: Int32?, imagePreprocessing: ImagePreprocessing,
                sparse: SparseModules? = nil, visionTowerDirectory: URL? = nil) {
        self.visionTowerDirectory = visionTowerDirectory
        self.imagePreprocessing = imagePreprocessing
        self.sparse = sparse
        self.vision = vision
        self.projector = projector
        self.language = language
        self.directory = directory
        self.layout = layout
        self.endOfSequenceTokenID = endOfSequenceTokenID
    }

    /// `eos_token_id` (an integer, or the first of a list) at the top level or in `text_config`.
    static func endOfSequence(in object: [String: Any]) -> Int32? {
        for source in [object, object["text_config"] as? [String: Any] ?? [:]] {
            if let id = source["eos_token_id"] as? Int { return Int32(id) }
            if let ids = source["eos_token_id"] as? [Int], let id = ids.first { return Int32(id) }
        }
        return nil
    }

    /// Loads a model directory in either layout; the layout is read from config.json.
    public static func load(directory: URL) throws(CheckpointError) -> LLaVAModel {
        let configURL = directory.appendingPathComponent("config.json")
        let data = try readJSON(configURL)
        guard let object = (try? JSONSerialization.jsonObject(with: data)) as? [String: Any] else {
            throw .invalidConfiguration(file: configURL.path, reason: "not a JSON object")
        }
        let endOfSequence = endOfSequence(in: object)
        if object["text_config"] != nil || (object["model_type"] as? String) == "llava" {
            return try loadHF(directory: directory, configURL: configURL, data: data, endOfSequence: endOfSequence)
        }
        if object["mm_vision_tower"] != nil {
            return try loadOriginal(directory: directory, configURL: configURL, data: data, endOfSequence: endOfSequence)
        }
        throw .invalidConfiguration(file: configURL.path, reason: "neither a llava-hf (text_config) nor an original LLaVA (mm_vision_tower) configuration")
    }

    /// The language model's configuration from `directory`'s config.json alone, in either layout, no weights read:
    /// what bounds the snapshots of the model's jobs (`dllava snapshot inspect --model`).
    public static func languageConfiguration(directory: URL) throws(CheckpointError) -> LlamaConfiguration {
        let configURL = directory.appendingPathComponent("config.json")
        let data = try readJSON(configURL)
        guard let object = (try? JSONSerialization.jsonObject(with: data)) as? [String: Any] else {
            throw .invalidConfiguration(file: configURL.path, reason: "not a JSON object")
        }
        let configuration = object["text_config"] != nil || (object["model_type"] as? String) == "llava"
            ? try decode(HFLayoutConfiguration.self, from: data, file: configURL).textConfiguration
            : try decode(LlamaConfiguration.self, from: data, file: configURL)
        let sizes = [configuration.hiddenLayers, configuration.attentionHeads, configuration.keyValueHeads, configuration.hiddenSize,
                     configuration.maxPositionEmbeddings]
        guard sizes.allSatisfy({ (1...(1 << 24)).contains($0) }) else {
            throw .invalidConfiguration(file: configURL.path, reason: "layers, heads, hidden size and context must lie in 1...\(1 << 24)")
        }
        return configuration
    }

    static func readJSON(_ url: URL) throws(CheckpointError) -> Data {
        guard let data = FileManager.default.contents(atPath: url.path) else {
            throw .invalidConfiguration(file: url.path, reason: "the file is missing or unreadable")
        }
        return data
    }

    static func decode<T: Decodable>(_ type: T.Type, from data: Data, file: URL) throws(CheckpointError) -> T {
        do {
            return try JSONDecoder().decode(type, from: data)
        } catch let error as DecodingError {
            throw .invalidConfiguration(file: file.path, reason: describe(error))
        } catch {
            throw .invalidConfiguration(file: file.path, reason: "\(error)")
        }
    }

    static func describe(_ error: DecodingError) -> String {
        switch error {
        case .keyNotFound(let key, _): return "missing field '\(key.stringValue)'"
        case .typeMismatch(_, let context), .valueNotFound(_, let context), .dataCorrupted(let context):
            let path = context.codingPath.map(\.stringValue).joined(separator: ".")
            return path.isEmpty ? context.debugDescription : "field '\(path)': \(context.debugDescription)"
        @unknown default: return "\(error)"
        }
    }

    static func loadOriginal(directory: URL, configURL: URL, data: Data, endOfSequence: Int32?) throws(CheckpointError) -> LLaVAModel {
        let mm = try decode(OriginalLayoutConfiguration.self, from: data, file: configURL)
        let text = try decode(LlamaConfiguration.self, from: data, file: configURL)
        guard mm.projectorType == "mlp2x_gelu" else {
            throw .invalidConfiguration(file: configURL.path, reason: "mm_projector_type '\(mm.projectorType)' is not supported (mlp2x_gelu only)")
        }
        guard mm.visionSelectFeature == "patch" else {
            throw .invalidConfiguration(file: configURL.path, reason: "mm_vision_select_feature '\(mm.visionSelectFeature)' is not supported (patch only)")
        }
        let towerDirectory = try resolveVisionTower(mm.visionTower, modelDirectory: directory, configURL: configURL)
        let towerConfigURL = towerDirectory.appendingPathComponent("config.json")
        let towerData = try readJSON(towerConfigURL)
        // A CLIPVisionModel config is flat; a full CLIPModel config nests it under vision_config.
        struct Nested: Decodable { var vision_config: CLIPVisionConfiguration? }
        let nested = try decode(Nested.self, from: towerData, file: towerConfigURL).vision_config
        let visionConfiguration: CLIPVisionConfiguration
        if let nested {
            visionConfiguration = nested
        } else {
            visionConfiguration = try decode(CLIPVisionConfiguration.self, from: towerData, file: towerConfigURL)
        }
        if let declared = mm.multimodalHiddenSize, declared != visionConfiguration.hiddenSize {
            throw .invalidConfiguration(file: configURL.path, reason: "mm_hidden_size \(declared) differs from the vision tower's hidden_size \(visionConfiguration.hiddenSize)")
        }
        let towerCheckpoint = try Checkpoint(directory: towerDirectory)
        let vision = try CLIPVisionTower(checkpoint: towerCheckpoint, prefix: "vision_model.", configuration: visionConfiguration, selectLayer: mm.visionSelectLayer)
        let checkpoint = try Checkpoint(directory: directory)
        let dv = visionConfiguration.hiddenSize, h = text.hiddenSize
        let projector = MultimodalProjector(
            linear1: try LinearLayer(checkpoint, "model.mm_projector.0.", inFeatures: dv, outFeatures: h, bias: true),
            linear2: try LinearLayer(checkpoint, "model.mm_projector.2.", inFeatures: h, outFeatures: h, bias: true))
        let language = try LlamaModel(checkpoint: checkpoint, prefix: "model.", headName: "lm_head.weight", configuration: text)
        var sparse: SparseModules?
        if let configuration = mm.sparseConfiguration {
            guard (1..<text.hiddenLayers).contains(configuration.sparseLayer) else {
                throw .invalidConfiguration(file: configURL.path, reason: "sparse_config.sparse_layer \(configuration.sparseLayer) is outside 1..<\(text.hiddenLayers)")
            }
            sparse = SparseModules(
                configuration: configuration,
                imagePredictor: Result { () throws(CheckpointError) in
                    try ImagePredictor(checkpoint: checkpoint, hiddenSize: text.hiddenSize, configuration: configuration) },
                outputTextPredictor: Result { () throws(CheckpointError) in
                    try OutputTextPredictor(checkpoint: checkpoint, hiddenSize: text.hiddenSize) })
        }
        return LLaVAModel(vision: vision, projector: projector, language: language, directory: directory, layout: .original, endOfSequenceTokenID: endOfSequence,
                          imagePreprocessing: .read(towerDirectory.appendingPathComponent("preprocessor_config.json"),
                                                    padToSquare: mm.imageAspectRatio == "pad"),
                          sparse: sparse, visionTowerDirectory: towerDirectory)
    }

    /// `mm_vision_tower` is a directory (absolute, or relative to the model) or a hub name whose
    /// last component names a directory beside or inside the model directory.
    static func resolveVisionTower(_ name: String, modelDirectory: URL, configURL: URL) throws(CheckpointError) -> URL {
        let last = (name as NSString).lastPathComponent
        let candidates = [
            name.hasPrefix("/") ? URL(fileURLWithPath: name) : modelDirectory.appendingPathComponent(name),
            modelDirectory.appendingPathComponent(last),
            modelDirectory.deletingLastPathComponent().appendingPathComponent(last),
        ]
        for candidate in candidates where FileManager.default.fileExists(atPath: candidate.appendingPathComponent("config.json").path) {
            return candidate.standardizedFileURL
        }
        throw .invalidConfiguration(file: configURL.path, reason: "mm_vision_tower '\(name)' not found: tried \(candidates.map(\.path).joined(separator: ", ")) (put the CLIP checkpoint directory there; nothing is downloaded)")
    }

    static func loadHF(directory: URL, configURL: URL, data: Data, endOfSequence: Int32?) throws(CheckpointError) -> LLaVAModel {
        let configuration = try decode(HFLayoutConfiguration.self, from: data, file: configURL)
        guard configuration.visionFeatureSelectStrategy == "default" else {
            throw .invalidConfiguration(file: configURL.path, reason: "vision_feature_select_strategy '\(configuration.visionFeatureSelectStrategy)' is not supported (default only)")
        }
        guard configuration.projectorActivation == "gelu" else {
            throw .invalidConfiguration(file: configURL.path, reason: "projector_hidden_act '\(configuration.projectorActivation)' is not supported (gelu only)")
        }
        let checkpoint = try Checkpoint(directory: directory)
        // Hub checkpoints use `language_model.model.*`; transformers >= 4.52 saves `model.language_model.*`.
        let modern = checkpoint.contains("model.language_model.embed_tokens.weight")
        let text = configuration.textConfiguration, visionConfiguration = configuration.visionConfiguration
        let vision = try CLIPVisionTower(checkpoint: checkpoint, prefix: modern ? "model.vision_tower.vision_model." : "vision_tower.vision_model.",
                                         configuration: visionConfiguration, selectLayer: configuration.visionFeatureLayer)
        let projectorPrefix = modern ? "model.multi_modal_projector." : "multi_modal_projector."
        let dv = visionConfiguration.hiddenSize, h = text.hiddenSize
        let projector = MultimodalProjector(
            linear1: try LinearLayer(checkpoint, projectorPrefix + "linear_1.", inFeatures: dv, outFeatures: h, bias: configuration.projectorBias),
            linear2: try LinearLayer(checkpoint, projectorPrefix + "linear_2.", inFeatures: h, outFeatures: h, bias: configuration.projectorBias))
        let language = try LlamaModel(checkpoint: checkpoint, prefix: modern ? "model.language_model." : "language_model.model.",
                                      headName: modern ? "lm_head.weight" : "language_model.lm_head.weight", configuration: text)
        return LLaVAModel(vision: vision, projector: projector, language: language, directory: directory, layout: .llavaHF, endOfSequenceTokenID: endOfSequence,
                          imagePreprocessing: .read(directory.appendingPathComponent("preprocessor_config.json"), padToSquare: nil))
    }

    /// Image embeddings `[patchCount, H]` per image: CLIP features, then the projector.
    /// `pixels`: one `[3, S, S]` normalised array per image.
    public func imageEmbeddings(_ pixels: [[Float]]) -> [Matrix] {
        // All images in one pass (stacked); an image's embeddings never depend on the others.
        let features = vision.features(pixels)
        guard !features.isEmpty else { return [] }
        let projected = projector(Matrix.concatenateRows(features))
        let patches = vision.configuration.patchCount
        return features.indices.map { projected.rows($0 * patches ..< ($0 + 1) * patches) }
    }
}
