// CLIP ViT vision tower as LLaVA-1.5 uses it (DYNAMIC_LLAVA.md section 1): patch embedding,
// class token, learned positions, pre-LayerNorm, pre-norm encoder blocks with quick_gelu; the
// features are the hidden state after layer `selectLayer` (-2: the second to last), CLS dropped.
// Follows transformers' CLIPVisionModel (modeling_clip.py).
import Numerics
import SafeTensors

/// `CLIPVisionConfig` fields (transformers' defaults where a config.json leaves one out).
public struct CLIPVisionConfiguration: Codable, Sendable, Equatable {
    public var hiddenSize: Int
    public var intermediateSize: Int
    public var hiddenLayers: Int
    public var attentionHeads: Int
    public var channels: Int
    public var imageSize: Int
    public var patchSize: Int
    public var layerNormEpsilon: Float
    public var hiddenActivation: Activation

    enum CodingKeys: String, CodingKey {
        case hiddenSize = "hidden_size", intermediateSize = "intermediate_size"
        case hiddenLayers = "num_hidden_layers", attentionHeads = "num_attention_heads"
        case channels = "num_channels", imageSize = "image_size", patchSize = "patch_size"
        case layerNormEpsilon = "layer_norm_eps", hiddenActivation = "hidden_act"
    }

    public init(hiddenSize: Int = 768, intermediateSize: Int = 3072, hiddenLayers: Int = 12, attentionHeads: Int = 12,
                channels: Int = 3, imageSize: Int = 224, patchSize: Int = 32, layerNormEpsilon: Float = 1e-5,
                hiddenActivation: Activation = .quickGELU) {
        self.hiddenSize = hiddenSize
        self.intermediateSize = intermediateSize
        self.hiddenLayers = hiddenLayers
        self.attentionHeads = attentionHeads
        self.channels = channels
        self.imageSize = imageSize
        self.patchSize = patchSize
        self.layerNormEpsilon = layerNormEpsilon
        self.hiddenActivation = hiddenActivation
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        let d = CLIPVisionConfiguration()
        hiddenSize = try c.decodeIfPresent(Int.self, forKey: .hiddenSize) ?? d.hiddenSize
        intermediateSize = try c.decodeIfPresent(Int.self, forKey: .intermediateSize) ?? d.intermediateSize
        hiddenLayers = try c.decodeIfPresent(Int.self, forKey: .hiddenLayers) ?? d.hiddenLayers
        attentionHeads = try c.decodeIfPresent(Int.self, forKey: .attentionHeads) ?? d.attentionHeads
        channels = try c.decodeIfPresent(Int.self, forKey: .channels) ?? d.channels
        imageSize = try c.decodeIfPresent(Int.self, forKey: .imageSize) ?? d.imageSize
        patchSize = try c.decodeIfPresent(Int.self, forKey: .patchSize) ?? d.patchSize
        layerNormEpsilon = try c.decodeIfPresent(Float.self, forKey: .layerNormEpsilon) ?? d.layerNormEpsilon
        hiddenActivation = try c.decodeIfPresent(Activation.self, forKey: .hiddenActivation) ?? d.hiddenActivation
    }

    /// Patches per image side (336 / 14 = 24).
    public var patchesPerSide: Int { imageSize / patchSize }
    /// Patch tokens per image (576 for LLaVA-1.5).
    public var patchCount: Int { patchesPerSide * patchesPerSide }
    public var headDimension: Int { hiddenSize / attentionHeads }
}

/// One pre-norm encoder block (`vision_model.encoder.layers.N`).
struct CLIPEncoderLayer: Sendable {
    let layerNorm1: LayerNormWeights        // layer_norm1
    let queryProjection: LinearLayer        // self_attn.q_proj (D, D)
    let keyProjection: LinearLayer          // self_attn.k_proj (D, D)
    let valueProjection: LinearLayer        // self_attn.v_proj (D, D)
    let outputProjection: LinearLayer       // self_attn.out_proj (D, D)
    let layerNorm2: LayerNormWeights        // layer_norm2
    let fc1: LinearLayer                    // mlp.fc1 (I, D)
    let fc2: LinearLayer                    // mlp.fc2 (D, I)

    init(randomWeights configuration: CLIPVisionConfiguration, storageType: StorageType, seed: UInt64) {
        let d = configuration.hiddenSize, i = configuration.intermediateSize, eps = configuration.layerNormEpsilon
        var counter = seed
        func layer(_ outFeatures: Int, _ inFeatures: Int) -> LinearLayer {
            counter &+= 1
            return LinearLayer(weight: WeightMatrix(randomRows: outFeatures, columns: inFeatures, storageType: storageType, seed: counter),
                               bias: Array(repeating: 0, count: outFeatures))
        }
        layerNorm1 = LayerNormWeights(features: d, epsilon: eps)
        queryProjection = layer(d, d)
        keyProjection = layer(d, d)
        valueProjection = layer(d, d)
        outputProjection = layer(d, d)
        layerNorm2 = LayerNormWeights(features: d, epsilon: eps)
        fc1 = layer(i, d)
        fc2 = layer(d, i)
    }

    init(_ checkpoint: Checkpoint, _ prefix: String, _ configuration: CLIPVisionConfiguration) throws(CheckpointError) {
        let d = configuration.hiddenSize, i = configuration.intermediateSize, eps = configuration.layerNormEpsilon
        layerNorm1 = try LayerNormWeights(checkpoint, prefix + "layer_norm1.", features: d, epsilon: eps)
        queryProjection = try LinearLayer(checkpoint, prefix + "self_attn.q_proj.", inFeatures: d, outFeatures: d, bias: true)
        keyProjection = try LinearLayer(checkpoint, prefix + "self_attn.k_proj.", inFeatures: d, outFeatures: d, bias: true)
        valueProjection = try LinearLayer(checkpoint, prefix + "self_attn.v_proj.", inFeatures: d, outFeatures: d, bias: true)
        outputProjection = try LinearLayer(checkpoint, prefix + "self_attn.out_proj.", inFeatures: d, outFeatures: d, bias: true)
        layerNorm2 = try LayerNormWeights(checkpoint, prefix + "layer_norm2.", features: d, epsilon: eps)
        fc1 = try LinearLayer(checkpoint, prefix + "mlp.fc1.", inFeatures: d, outFeatures: i, bias: true)
        fc2 = try LinearLayer(checkpoint, prefix + "mlp.fc2.", inFeatures: i, outFeatures: d, bias: true)
    }

    /// `x`: `[images * tokens, D]`, the images' tokens stacked; attention is bidirectional within
    /// each image (`tokens` rows) and never crosses images.
    func callAsFunction(_ x: Matrix, tokensPerImage tokens: Int, configuration: CLIPVisionConfiguration) -> Matrix {
        precondition(x.rows % tokens == 0, "vision layer: \(x.rows) rows are not whole images of \(tokens) tokens")
        let normed = layerNorm1(x)
        let q = queryProjection(normed), k = keyProjection(normed), v = valueProjection(normed)
        var attended = Matrix(zeros: x.rows, x.columns)
        let d = x.columns, heads = configuration.attentionHeads, headDimension = configuration.headDimension
        q.values.withUnsafeBufferPointer { qp in
            k.values.withUnsafeBufferPointer { kp in
                v.values.withUnsafeBufferPointer { vp in
                    attended.values.withUnsafeMutableBufferPointer { op in
                        for first in stride(from: 0, to: x.rows, by: tokens) {
                            let offset = first * d
                            multiHeadAttention(
                                queries: qp.baseAddress! + offset, queryStride: d, queryCount: tokens,
                                keys: kp.baseAddress! + offset, keyStride: d, values: vp.baseAddress! + offset, valueStride: d, keyCount: tokens,
                                heads: heads, keyValueHeads: heads, headDimension: headDimension,
                                scale: 1 / Float(headDimension).squareRoot(), mask: nil,
                                output: op.baseAddress! + offset, outputStride: d)
                        }
                    }
                }
            }
        }
        var hidden = x
        hidden += outputProjection(attended)
        var inner = fc1(layerNorm2(hidden))
        activate(&inner, configuration.hiddenActivation)
        hidden += fc2(inner)
        return hidden
    }
}

/// CLIP's vision transformer, run up to the layer LLaVA reads its features from.
public struct CLIPVisionTower: Sendable {
    public let configuration: CLIPVisionConfiguration
    /// Index into `hidden_states` (embeddings = 0); negative counts from the end (-2 = LLaVA-1.5).
    public let selectLayer: Int
    let patchEmbedding: WeightMatrix        // embeddings.patch_embedding.weight (D, C*P*P), no bias
    let classEmbedding: [Float]             // embeddings.class_embedding (D)
    let positionEmbedding: [Float]          // embeddings.position_embedding.weight (N+1, D)
    let preLayerNorm: LayerNormWeights      // pre_layrnorm (sic, the checkpoint's spelling)
    let layers: [CLIPEncoderLayer]          // encoder.layers.N, only those the features need

    /// `prefix` is where `embeddings.*` lives, e.g. `vision_model.` (a CLIPVisionModel checkpoint)
    /// or `vision_tower.vision_model.` (llava-hf).
    public init(checkpoint: Checkpoint, prefix: String, configuration: CLIPVisionConfiguration, selectLayer: Int) throws(CheckpointError) {
        self.configuration = configuration
        self.selectLayer = selectLayer
        let c = configuration
        let d = c.hiddenSize, patchInputs = c.channels * c.patchSize * c.patchSize
        let stateIndex = selectLayer < 0 ? c.hiddenLayers + 1 + selectLayer : selectLayer
        guard (0...c.hiddenLayers).contains(stateIndex) else {
            throw .invalidConfiguration(file: checkpoint.directory.path, reason: "vision select layer \(selectLayer) is outside 0...\(c.hiddenLayers)")
        }
        guard d % c.attentionHeads == 0, c.imageSize % c.patchSize == 0 else {
            throw .invalidConfiguration(file: checkpoint.directory.path, reason: "vision hidden size / heads or image / patch size do not divide")
        }
        patchEmbedding = try checkpoint.weight(prefix + "embeddings.patch_embedding.weight", shape: [d, c.channels, c.patchSize, c.patchSize])
        precondition(patchEmbedding.columns == patchInputs)
        classEmbedding = try checkpoint.floats(prefix + "embeddings.class_embedding", shape: [d])
        positionEmbedding = try checkpoint.floats(prefix + "embeddings.position_embedding.weight", shape: [c.patchCount + 1, d])
        preLayerNorm = try LayerNormWeights(checkpoint, prefix + "pre_layrnorm.", features: d, epsilon: c.layerNormEpsilon)
        var layers: [CLIPEncoderLayer] = []
        for n in 0..<stateIndex {
            layers.append(try CLIPEncoderLayer(checkpoint, prefix + "encoder.layers.\(n).", c))
        }
        self.layers = layers
    }

    /// A tower with small random weights (benchmarks), seeded.
    public init(randomWeights c: CLIPVisionConfiguration, selectLayer: Int, storageType: StorageType, seed: UInt64) {
        configuration = c
        self.selectLayer = selectLayer
        let d = c.hiddenSize
        patchEmbedding = WeightMatrix(randomRows: d, columns: c.channels * c.patchSize * c.patchSize, storageType: storageType, seed: seed)
        classEmbedding = WeightMatrix(randomRows: 1, columns: d, storageType: .float32, seed: seed &+ 1).widened()
        positionEmbedding = WeightMatrix(randomRows: c.patchCount + 1, columns: d, storageType: .float32, seed: seed &+ 2).widened()
        preLayerNorm = LayerNormWeights(features: d, epsilon: c.layerNormEpsilon)
        let stateIndex = selectLayer < 0 ? c.hiddenLayers + 1 + selectLayer : selectLayer
        layers = (0..<stateIndex).map { n in CLIPEncoderLayer(randomWeights: c, storageType: storageType, seed: seed &+ 100 &* UInt64(n + 1)) }
    }

    /// Encoder layers actually run (those below the selected hidden state).
    public var layerCount: Int { layers.count }

    /// Patch features of several images in one pass: their tokens are stacked, so each weight is
    /// read once for all of them, and attention stays within each image. An image's features do
    /// not depend on the others (the products are row-invariant).
    ///
    /// - Parameter images: each `[C, S, S]` normalised pixels, S = imageSize.
    /// - Returns: per image `[patchCount, hiddenSize]`: the selected hidden state, CLS dropped.
    public func features(_ images: [[Float]]) -> [Matrix] {
        guard !images.isEmpty else { return [] }
        let c = configuration
        let tokens = c.patchCount + 1, d = c.hiddenSize
        for pixels in images {
            precondition(pixels.count == c.channels * c.imageSize * c.imageSize, "vision: pixel array is not [\(c.channels), \(c.imageSize), \(c.imageSize)]")
        }
        let embedded = linear(Matrix.concatenateRows(images.map(patches)), patchEmbedding)
        // Per image: the class token first, then the patches; learned positions added to all.
        var hidden = Matrix(zeros: images.count * tokens, d)
        for image in images.indices {
            for t in 0..<tokens {
                for j in 0..<d {
                    let value = t == 0 ? classEmbedding[j] : embedded.values[(image * c.patchCount + t - 1) * d + j]
                    hidden.values[(image * tokens + t) * d + j] = value + positionEmbedding[t * d + j]
                }
            }
        }
        hidden = preLayerNorm(hidden)
        for layer in layers {
            hidden = layer(hidden, tokensPerImage: tokens, configuration: c)
        }
        return images.indices.map { hidden.rows(($0 * tokens + 1) ..< ($0 + 1) * tokens) }
    }

    /// Patch features of one image; see `features(_:)` for several.
    public func features(_ pixels: [Float]) -> Matrix {
        features([pixels])[0]
    }

    /// Unfolds `[C, S, S]` pixels into `[patchCount, C * P * P]`, patches in row-major order,
    /// each patch flattened as `(channel, dy, dx)`: the layout of the conv weight `[D, C, P, P]`.
    func patches(_ image: [Float]) -> Matrix {
        let c = configuration
        let p = c.patchSize, s = c.imageSize, side = c.patchesPerSide
        let width = c.channels * p * p
        var out = [Float](repeating: 0, count: c.patchCount * width)
        for py in 0..<side {
            for px in 0..<side {
                let base = (py * side + px) * width
                for channel in 0..<c.channels {
                    for dy in 0..<p {
                        let source = channel * s * s + (py * p + dy) * s + px * p
                        let destination = base + channel * p * p + dy * p
                        for dx in 0..<p { out[destination + dx] = image[source + dx] }
                    }
                }
            }
        }
        return Matrix(rows: c.patchCount, columns: width, values: out)
    }
}

/// LLaVA's `mlp2x_gelu` projector: Linear(Dv -> H), exact GELU, Linear(H -> H).
public struct MultimodalProjector: Sendable {
    public let linear1: LinearLayer   // mm_projector.0 / multi_modal_projector.linear_1 (H, Dv)
    public let linear2: LinearLayer   // mm_projector.2 / multi_modal_projector.linear_2 (H, H)

    public init(linear1: LinearLayer, linear2: LinearLayer) {
        self.linear1 = linear1
        self.linear2 = linear2
    }

    /// `[N, Dv]` -> `[N, H]`.
    public func callAsFunction(_ features: Matrix) -> Matrix {
        var hidden = linear1(features)
        activate(&hidden, .gelu)
        return linear2(hidden)
    }
}
