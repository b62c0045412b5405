// Dynamic-LLaVA's learned predictors (DYNAMIC_LLAVA.md section 3; reference:
// Osilly/dynamic_llava, the image and output-text score predictors). Both read hidden states at
// the input of decoder layer `sparse_layer` and return logits [N, 2] whose channel 0 means "keep".
import Numerics
import SafeTensors

/// `sparse_config` of a Dynamic-LLaVA config.json (released field names; unknown fields ignored).
public struct SparseConfiguration: Codable, Sendable, Equatable {
    public var sparseLayer: Int
    public var visionKeepRate: Double
    public var outputTextKeepRate: Double
    public var outputTextLengthForTraining: Int
    public var useVisionPredictor: Bool
    public var useTextPredictor: Bool
    public var useOutputTextPredictor: Bool
    public var useInstructPredictor: Bool
    public var modelDimension: Int
    public var heads: Int
    public var feedForwardDimension: Int
    public var layers: Int

    enum CodingKeys: String, CodingKey {
        case sparseLayer = "sparse_layer", visionKeepRate = "vision_keep_rate", outputTextKeepRate = "output_text_keep_rate"
        case outputTextLengthForTraining = "output_text_len_for_training", useVisionPredictor = "use_vision_predictor"
        case useTextPredictor = "use_text_predictor", useOutputTextPredictor = "use_output_text_predictor"
        case useInstructPredictor = "use_instruct_predictor", modelDimension = "d_model", heads = "nhead"
        case feedForwardDimension = "dim_feedforward", layers = "num_layers"
    }

    /// The released values (DYNAMIC_LLAVA.md section 5).
    public init() {
        sparseLayer = 2
        visionKeepRate = 0.2
        outputTextKeepRate = 0.5
        outputTextLengthForTraining = 50
        useVisionPredictor = true
        useTextPredictor = true
        useOutputTextPredictor = true
        useInstructPredictor = false
        modelDimension = 512
        heads = 8
        feedForwardDimension = 2048
        layers = 2
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        let d = SparseConfiguration()
        sparseLayer = try c.decodeIfPresent(Int.self, forKey: .sparseLayer) ?? d.sparseLayer
        visionKeepRate = try c.decodeIfPresent(Double.self, forKey: .visionKeepRate) ?? d.visionKeepRate
        outputTextKeepRate = try c.decodeIfPresent(Double.self, forKey: .outputTextKeepRate) ?? d.outputTextKeepRate
        outputTextLengthForTraining = try c.decodeIfPresent(Int.self, forKey: .outputTextLengthForTraining) ?? d.outputTextLengthForTraining
        useVisionPredictor = try c.decodeIfPresent(Bool.self, forKey: .useVisionPredictor) ?? d.useVisionPredictor
        useTextPredictor = try c.decodeIfPresent(Bool.self, forKey: .useTextPredictor) ?? d.useTextPredictor
        useOutputTextPredictor = try c.decodeIfPresent(Bool.self, forKey: .useOutputTextPredictor) ?? d.useOutputTextPredictor
        useInstructPredictor = try c.decodeIfPresent(Bool.self, forKey: .useInstructPredictor) ?? d.useInstructPredictor
        modelDimension = try c.decodeIfPresent(Int.self, forKey: .modelDimension) ?? d.modelDimension
        heads = try c.decodeIfPresent(Int.self, forKey: .heads) ?? d.heads
        feedForwardDimension = try c.decodeIfPresent(Int.self, forKey: .feedForwardDimension) ?? d.feedForwardDimension
        layers = try c.decodeIfPresent(Int.self, forKey: .layers) ?? d.layers
    }
}

/// A random linear layer (benchmarks): small weights, zero bias.
func randomLayer(_ outFeatures: Int, _ inFeatures: Int, seed: UInt64) -> LinearLayer {
    LinearLayer(weight: WeightMatrix(randomRows: outFeatures, columns: inFeatures, storageType: .float32, seed: seed),
                bias: Array(repeating: 0, count: outFeatures))
}

/// One pre-norm ViT block of the image predictor (`transformer.N`):
/// `x += proj(attn(qkv(norm1(x))))`, `x += fc2(GELU(fc1(norm2(x))))`; qkv has no bias.
struct PredictorBlock: Sendable {
    let norm1: LayerNormWeights      // norm1 (d)
    let queryKeyValue: LinearLayer   // attn.qkv (3d, d), no bias
    let projection: LinearLayer      // attn.proj (d, d)
    let norm2: LayerNormWeights      // norm2 (d)
    let fc1: LinearLayer             // mlp.fc1 (ff, d)
    let fc2: LinearLayer             // mlp.fc2 (d, ff)
    let heads: Int

    init(_ checkpoint: Checkpoint, _ prefix: String, dimension d: Int, heads: Int) throws(CheckpointError) {
        norm1 = try LayerNormWeights(checkpoint, prefix + "norm1.", features: d, epsilon: 1e-5)
        queryKeyValue = try LinearLayer(checkpoint, prefix + "attn.qkv.", inFeatures: d, outFeatures: 3 * d, bias: false)
        projection = try LinearLayer(checkpoint, prefix + "attn.proj.", inFeatures: d, outFeatures: d, bias: true)
        norm2 = try LayerNormWeights(checkpoint, prefix + "norm2.", features: d, epsilon: 1e-5)
        fc1 = try LinearLayer(checkpoint, prefix + "mlp.fc1.", inFeatures: d)
        fc2 = try LinearLayer(checkpoint, prefix + "mlp.fc2.", inFeatures: fc1.weight.rows, outFeatures: d, bias: true)
        self.heads = heads
    }

    init(randomWeights d: Int, heads: Int, feedForward: Int, seed: UInt64) {
        norm1 = LayerNormWeights(features: d, epsilon: 1e-5)
        queryKeyValue = LinearLayer(weight: WeightMatrix(randomRows: 3 * d, columns: d, storageType: .float32, seed: seed), bias: nil)
        projection = randomLayer(d, d, seed: seed &+ 1)
        norm2 = LayerNormWeights(features: d, epsilon: 1e-5)
        fc1 = randomLayer(feedForward, d, seed: seed &+ 2)
        fc2 = randomLayer(d, feedForward, seed: seed &+ 3)
        self.heads = heads
    }

    /// `x`: `[N, d]` (one image's tokens; attention over all of them, no mask).
    func callAsFunction(_ x: Matrix) -> Matrix {
        let d = x.columns, headDimension = d / heads
        let qkv = queryKeyValue(norm1(x))   // [N, 3d]: q | k | v
        var attended = Matrix(zeros: x.rows, d)
        qkv.values.withUnsafeBufferPointer { p in
            attended.values.withUnsafeMutableBufferPointer { o in
                multiHeadAttention(queries: p.baseAddress!, queryStride: 3 * d, queryCount: x.rows,
                                   keys: p.baseAddress! + d, keyStride: 3 * d,
                                   values: p.baseAddress! + 2 * d, valueStride: 3 * d, keyCount: x.rows,
                                   heads: heads, keyValueHeads: heads, headDimension: headDimension,
                                   scale: 1 / Float(headDimension).squareRoot(), mask: nil,
                                   output: o.baseAddress!, outputStride: d)
            }
        }
        var hidden = x
        hidden += projection(attended)
        var inner = fc1(norm2(hidden))
        activate(&inner, .gelu)
        hidden += fc2(inner)
        return hidden
    }
}

/// The image predictor (`model.image_score_predictor`): scores each image token of one sample.
public struct ImagePredictor: Sendable {
    let downNorm: LayerNormWeights     // down_mlp.0 (H)
    let down: LinearLayer              // down_mlp.1 (d, H), then GELU
    let blocks: [PredictorBlock]       // transformer.N
    let output: [LinearLayer]          // output_mlp.{0,2,4}: d -> ... -> 2, GELU between

    public init(checkpoint: Checkpoint, prefix: String = "model.image_score_predictor.", hiddenSize: Int,
                configuration: SparseConfiguration) throws(CheckpointError) {
        downNorm = try LayerNormWeights(checkpoint, prefix + "down_mlp.0.", features: hiddenSize, epsilon: 1e-5)
        down = try LinearLayer(checkpoint, prefix + "down_mlp.1.", inFeatures: hiddenSize)
        let d = down.weight.rows
        guard d % 2 == 0, d % configuration.heads == 0 else {
            throw .invalidConfiguration(file: checkpoint.directory.path, reason: "image predictor width \(d) does not split into \(configuration.heads) heads and two halves")
        }
        var blocks: [PredictorBlock] = []
        for n in 0..<configuration.layers {
            blocks.append(try PredictorBlock(checkpoint, prefix + "transformer.\(n).", dimension: d, heads: configuration.heads))
        }
        self.blocks = blocks
        var output: [LinearLayer] = []
        var width = d
        for index in [0, 2, 4] {
            let layer = try LinearLayer(checkpoint, prefix + "output_mlp.\(index).", inFeatures: width)
            width = layer.weight.rows
            output.append(layer)
        }
        guard width == 2 else {
            throw .wrongShape(file: checkpoint.directory.path, tensor: prefix + "output_mlp.4.weight", expected: [2, output[1].weight.rows], found: [width, output[1].weight.rows])
        }
        self.output = output
    }

    /// A predictor with small random weights at `configuration`'s sizes (benchmarks), seeded.
    public init(randomWeights configuration: SparseConfiguration, hiddenSize: Int, seed: UInt64) {
        let d = configuration.modelDimension
        downNorm = LayerNormWeights(features: hiddenSize, epsilon: 1e-5)
        down = randomLayer(d, hiddenSize, seed: seed)
        blocks = (0..<configuration.layers).map {
            PredictorBlock(randomWeights: d, heads: configuration.heads, feedForward: configuration.feedForwardDimension, seed: seed &+ 10 &* UInt64($0 + 1))
        }
        output = [randomLayer(d / 2, d, seed: seed &+ 100), randomLayer(d / 4, d / 2, seed: seed &+ 101), randomLayer(2, d / 4, seed: seed &+ 102)]
    }

    /// Logits `[N, 2]` (channel 0 = keep) for one sample's image-token hidden states `[N, H]`.
    public func logits(_ imageHidden: Matrix) -> Matrix {
        var x = down(downNorm(imageHidden))
        activate(&x, .gelu)
        for block in blocks { x = block(x) }
        // Local/global mix: the first half of the channels stays per token; the second half is
        // replaced, for every token, by its mean over the image tokens (policy weights are all 1
        // at inference).
        let d = x.columns, half = d / 2, n = x.rows
        var means = [Double](repeating: 0, count: d - half)
        for t in 0..<n { for j in half..<d { means[j - half] += Double(x.values[t * d + j]) } }
        for t in 0..<n { for j in half..<d { x.values[t * d + j] = Float(means[j - half] / Double(n)) } }
        for (i, layer) in output.enumerated() {
            x = layer(x)
            if i < output.count - 1 { activate(&x, .gelu) }
        }
        return x
    }
}

/// The output-text predictor (`model.output_text_score_predictor`): per token, no context:
/// LayerNorm(H) -> Linear -> GELU -> Linear -> GELU -> Linear -> GELU -> Linear(., 2).
public struct OutputTextPredictor: Sendable {
    let norm: LayerNormWeights   // output_mlp.0 (H)
    let layers: [LinearLayer]    // output_mlp.{1,3,5,7}

    public init(checkpoint: Checkpoint, prefix: String = "model.output_text_score_predictor.", hiddenSize: Int) throws(CheckpointError) {
        norm = try LayerNormWeights(checkpoint, prefix + "output_mlp.0.", features: hiddenSize, epsilon: 1e-5)
        var layers: [LinearLayer] = []
        var width = hiddenSize
        for index in [1, 3, 5, 7] {
            let layer = try LinearLayer(checkpoint, prefix + "output_mlp.\(index).", inFeatures: width)
            width = layer.weight.rows
            layers.append(layer)
        }
        guard width == 2 else {
            throw .wrongShape(file: checkpoint.directory.path, tensor: prefix + "output_mlp.7.weight", expected: [2, layers[2].weight.rows], found: [width, layers[2].weight.rows])
        }
        self.layers = layers
    }

    /// A predictor with small random weights (benchmarks), seeded; widths as released (512, 256, 128).
    public init(randomWeights hiddenSize: Int, seed: UInt64) {
        norm = LayerNormWeights(features: hiddenSize, epsilon: 1e-5)
        layers = [randomLayer(512, hiddenSize, seed: seed), randomLayer(256, 512, seed: seed &+ 1),
                  randomLayer(128, 256, seed: seed &+ 2), randomLayer(2, 128, seed: seed &+ 3)]
    }

    init(norm: LayerNormWeights, layers: [LinearLayer]) {
        self.norm = norm
        self.layers = layers
    }

    /// The same predictor with `shift` added to the keep logit (channel 0 of the last layer's
    /// bias): benchmarks with random weights use it to calibrate the gate to a target keep rate.
    public func shiftingKeepLogit(by shift: Float) -> OutputTextPredictor {
        let last = layers[layers.count - 1]
        var bias = last.bias ?? [0, 0]
        bias[0] += shift
        return OutputTextPredictor(norm: norm, layers: Array(layers.dropLast()) + [LinearLayer(weight: last.weight, bias: bias)])
    }

    /// Logits `[N, 2]` (channel 0 = keep) for hidden states `[N, H]`, each row alone.
    public func logits(_ hidden: Matrix) -> Matrix {
        var x = norm(hidden)
        for (i, layer) in layers.enumerated() {
            x = linear(x, layer.weight, bias: layer.bias)
            if i < layers.count - 1 { activate(&x, .gelu) }
        }
        return x
    }
}

extension ImagePredictor {
    /// Multiply-adds x2 for `tokens` image tokens.
    public func flops(tokens n: Int) -> Int {
        let h = downNorm.weight.count, d = down.weight.rows
        var total = 2 * n * h * d
        for block in blocks {
            let ff = block.fc1.weight.rows
            total += 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * ff
        }
        return total + output.reduce(0) { $0 + 2 * n * $1.weight.rows * $1.weight.columns }
    }
}

extension OutputTextPredictor {
    /// Multiply-adds x2 for `tokens` tokens.
    public func flops(tokens n: Int) -> Int {
        layers.reduce(0) { $0 + 2 * n * $1.weight.rows * $1.weight.columns }
    }
}
