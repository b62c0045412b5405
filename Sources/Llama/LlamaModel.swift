// LLaMA decoder over embeddings (transformers' LlamaModel / LlamaForCausalLM). It knows nothing
// of images or predictors: callers pass embeddings, per-token positions and "write K/V" flags,
// and may run any range of layers (Dynamic-LLaVA prunes tokens between two ranges).
import Numerics
import SafeTensors

/// One decoder layer (`model.layers.N`): pre-RMSNorm attention with RoPE, pre-RMSNorm SwiGLU FFN.
struct LlamaDecoderLayer: Sendable {
    let inputNorm: [Float]              // input_layernorm.weight (H)
    let queryProjection: WeightMatrix   // self_attn.q_proj.weight (heads*d, H)
    let keyProjection: WeightMatrix     // self_attn.k_proj.weight (kvHeads*d, H)
    let valueProjection: WeightMatrix   // self_attn.v_proj.weight (kvHeads*d, H)
    let outputProjection: WeightMatrix  // self_attn.o_proj.weight (H, heads*d)
    let postAttentionNorm: [Float]      // post_attention_layernorm.weight (H)
    let gateProjection: WeightMatrix    // mlp.gate_proj.weight (I, H)
    let upProjection: WeightMatrix      // mlp.up_proj.weight (I, H)
    let downProjection: WeightMatrix    // mlp.down_proj.weight (H, I)

    init(_ checkpoint: Checkpoint, _ prefix: String, _ c: LlamaConfiguration) throws(CheckpointError) {
        let h = c.hiddenSize, i = c.intermediateSize, q = c.attentionHeads * c.headDimension, kv = c.keyValueWidth
        inputNorm = try checkpoint.floats(prefix + "input_layernorm.weight", shape: [h])
        queryProjection = try checkpoint.weight(prefix + "self_attn.q_proj.weight", shape: [q, h])
        keyProjection = try checkpoint.weight(prefix + "self_attn.k_proj.weight", shape: [kv, h])
        valueProjection = try checkpoint.weight(prefix + "self_attn.v_proj.weight", shape: [kv, h])
        outputProjection = try checkpoint.weight(prefix + "self_attn.o_proj.weight", shape: [h, q])
        postAttentionNorm = try checkpoint.floats(prefix + "post_attention_layernorm.weight", shape: [h])
        gateProjection = try checkpoint.weight(prefix + "mlp.gate_proj.weight", shape: [i, h])
        upProjection = try checkpoint.weight(prefix + "mlp.up_proj.weight", shape: [i, h])
        downProjection = try checkpoint.weight(prefix + "mlp.down_proj.weight", shape: [h, i])
    }

    init(inputNorm: [Float], queryProjection: WeightMatrix, keyProjection: WeightMatrix, valueProjection: WeightMatrix,
         outputProjection: WeightMatrix, postAttentionNorm: [Float], gateProjection: WeightMatrix,
         upProjection: WeightMatrix, downProjection: WeightMatrix) {
        self.inputNorm = inputNorm
        self.queryProjection = queryProjection
        self.keyProjection = keyProjection
        self.valueProjection = valueProjection
        self.outputProjection = outputProjection
        self.postAttentionNorm = postAttentionNorm
        self.gateProjection = gateProjection
        self.upProjection = upProjection
        self.downProjection = downProjection
    }
}

/// What a caller may observe inside a forward pass.
public struct ForwardObservation: Sendable {
    /// `(layer, sequence) -> [heads, queries, keys]` softmax weights of that layer's attention,
    /// recorded for the layers in `attentionLayers` (FastV reads them). Keys are the sequence's
    /// cells in cache order.
    public var attentionWeights: [Int: [Int: [Float]]] = [:]
    public var attentionLayers: Set<Int> = []
    /// Hidden states after each layer in `hiddenLayers` (parity tests trace them).
    public var hiddenAfterLayer: [Int: Matrix] = [:]
    public var hiddenLayers: Set<Int> = []
    /// Multiply-adds x2 of the decoder layers run, per cache sequence, counted from the actual
    /// shapes (projections, FFN, and attention over the keys each token was scored against).
    public var flops: [Int: Int] = [:]

    public init(attentionLayers: Set<Int> = [], hiddenLayers: Set<Int> = []) {
        self.attentionLayers = attentionLayers
        self.hiddenLayers = hiddenLayers
    }
}

/// The LLaMA language model: embeddings, decoder layers, final norm, LM head.
public struct LlamaModel: Sendable {
    public let configuration: LlamaConfiguration
    let embedTokens: WeightMatrix        // model.embed_tokens.weight (V, H)
    let layers: [LlamaDecoderLayer]      // model.layers.N
    let finalNorm: [Float]               // model.norm.weight (H)
    let languageModelHead: WeightMatrix  // lm_head.weight (V, H)
    let rotary: RotaryEmbedding

    /// - Parameters:
    ///   - prefix: where `embed_tokens`, `layers`, `norm` live (`model.` or `language_model.model.`).
    ///   - headName: the LM head weight's name (`lm_head.weight` or `language_model.lm_head.weight`).
    public init(checkpoint: Checkpoint, prefix: String, headName: String, configuration c: LlamaConfiguration) throws(CheckpointError) {
        guard c.hiddenSize % c.attentionHeads == 0, c.attentionHeads % c.keyValueHeads == 0, c.headDimension % 2 == 0 else {
            throw .invalidConfiguration(file: checkpoint.directory.path, reason: "hidden_size \(c.hiddenSize), heads \(c.attentionHeads), key/value heads \(c.keyValueHeads) do not divide")
        }
        configuration = c
        embedTokens = try checkpoint.weight(prefix + "embed_tokens.weight", shape: [c.vocabularySize, c.hiddenSize])
        var layers: [LlamaDecoderLayer] = []
        for n in 0..<c.hiddenLayers { layers.append(try LlamaDecoderLayer(checkpoint, prefix + "layers.\(n).", c)) }
        self.layers = layers
        finalNorm = try checkpoint.floats(prefix + "norm.weight", shape: [c.hiddenSize])
        if c.tieWordEmbeddings && !checkpoint.contains(headName) {
            languageModelHead = embedTokens
        } else {
            languageModelHead = try checkpoint.weight(headName, shape: [c.vocabularySize, c.hiddenSize])
        }
        rotary = RotaryEmbedding(headDimension: c.headDimension, theta: c.ropeTheta)
    }

    /// A model with small random weights stored as `storageType` (benchmarks), seeded.
    public init(randomWeights c: LlamaConfiguration, storageType: StorageType, seed: UInt64) {
        var counter = seed
        func weight(_ rows: Int, _ columns: Int) -> WeightMatrix {
            counter &+= 1
            return WeightMatrix(randomRows: rows, columns: columns, storageType: storageType, seed: counter)
        }
        let h = c.hiddenSize, q = c.attentionHeads * c.headDimension
        configuration = c
        embedTokens = weight(c.vocabularySize, h)
        layers = (0..<c.hiddenLayers).map { _ in
            LlamaDecoderLayer(inputNorm: Array(repeating: 1, count: h), queryProjection: weight(q, h),
                              keyProjection: weight(c.keyValueWidth, h), valueProjection: weight(c.keyValueWidth, h),
                              outputProjection: weight(h, q), postAttentionNorm: Array(repeating: 1, count: h),
                              gateProjection: weight(c.intermediateSize, h), upProjection: weight(c.intermediateSize, h),
                              downProjection: weight(h, c.intermediateSize))
        }
        finalNorm = Array(repeating: 1, count: h)
        languageModelHead = weight(c.vocabularySize, h)
        rotary = RotaryEmbedding(headDimension: c.headDimension, theta: c.ropeTheta)
    }

    public var layerCount: Int { layers.count }

    /// How the decoder's projection weights are stored (that of the first layer's query projection).
    public var storageType: StorageType { layers.first?.queryProjection.storageType ?? embedTokens.storageType }

    /// Bytes of all weights as stored.
    public var weightByteCount: Int {
        embedTokens.byteCount + languageModelHead.byteCount + layers.reduce(0) { total, l in
            total + [l.queryProjection, l.keyProjection, l.valueProjection, l.outputProjection,
                     l.gateProjection, l.upProjection, l.downProjection].reduce(0) { $0 + $1.byteCount }
        }
    }

    /// Token embeddings `[ids.count, H]`. Ids must be in `0..<vocabularySize`.
    public func embed(_ ids: [Int32]) -> Matrix {
        let h = configuration.hiddenSize
        var values = [Float](repeating: 0, count: ids.count * h)
        values.withUnsafeMutableBufferPointer { out in
            for (t, id) in ids.enumerated() {
                precondition(id >= 0 && Int(id) < configuration.vocabularySize, "token id \(id) outside the vocabulary")
                embedTokens.widenRows(Int(id)..<Int(id) + 1, into: out.baseAddress! + t * h)
            }
        }
        return Matrix(rows: ids.count, columns: h, values: values)
    }

    /// Runs decoder layers `range` over `hidden` `[T, H]` in place, reading and appending to `cache`.
    ///
    /// Each token attends to its sequence's cells in that layer (all of them: they precede it)
    /// and to the batch's earlier tokens of its sequence that write K/V, and always to itself.
    /// Afterwards the cache holds the new cells of the tokens with `writesKeyValue`.
    public func forward(_ hidden: inout Matrix, batch: TokenBatch, layers range: Range<Int>,
                        cache: inout KeyValueCache, observation: inout ForwardObservation) {
        precondition(hidden.rows == batch.count && hidden.columns == configuration.hiddenSize, "forward: hidden is not [\(batch.count), \(configuration.hiddenSize)]")
        let spans = batch.spans
        for l in range {
            hidden = layer(l, hidden, batch: batch, spans: spans, cache: &cache, observation: &observation)
            if observation.hiddenLayers.contains(l) { observation.hiddenAfterLayer[l] = hidden }
        }
    }

    func layer(_ l: Int, _ x: Matrix, batch: TokenBatch, spans: [(sequence: Int, tokens: Range<Int>)],
               cache: inout KeyValueCache, observation: inout ForwardObservation) -> Matrix {
        let c = configuration, weights = layers[l]
        let product = { (input: Matrix, weight: WeightMatrix) in linear(input, weight) }
        let normed = rmsNorm(x, weight: weights.inputNorm, epsilon: c.rmsNormEpsilon)
        var queries = product(normed, weights.queryProjection)
        var keys = product(normed, weights.keyProjection)
        let values = product(normed, weights.valueProjection)
        rotary.apply(&queries, heads: c.attentionHeads, positions: batch.positions)
        rotary.apply(&keys, heads: c.keyValueHeads, positions: batch.positions)

        let width = c.keyValueWidth, queryWidth = c.attentionHeads * c.headDimension, h = c.hiddenSize
        var attended = Matrix(zeros: x.rows, queryWidth)
        for (s, tokens) in spans {
            // Move the cells out so appending does not copy them (copy-on-write).
            var cells = SequenceCells()
            swap(&cells, &cache.layers[l][s])
            cells.append(positions: batch.positions[tokens], keys: keys.values[tokens.lowerBound * width ..< tokens.upperBound * width],
                         values: values.values[tokens.lowerBound * width ..< tokens.upperBound * width])
            let keyCount = cells.cellCount, queryCount = tokens.count
            let writes = batch.writesKeyValue[tokens]
            observation.flops[s, default: 0] += 2 * 2 * c.attentionHeads * c.headDimension * queryCount * keyCount
                + 2 * queryCount * h * (queryWidth + 2 * width) + 2 * queryCount * queryWidth * h + 3 * 2 * queryCount * h * c.intermediateSize
            let mask = cells.attentionMask(newTokens: writes)
            let recordWeights = observation.attentionLayers.contains(l)
            var weightsOut = recordWeights ? [Float](repeating: 0, count: c.attentionHeads * queryCount * keyCount) : []
            queries.values.withUnsafeBufferPointer { qp in
                cells.keys.withUnsafeBytes { kp in
                    cells.values.withUnsafeBytes { vp in
                        attended.values.withUnsafeMutableBufferPointer { op in
                            weightsOut.withUnsafeMutableBufferPointer { wp in
                                multiHeadAttention(
                                    queries: qp.baseAddress! + tokens.lowerBound * queryWidth, queryStride: queryWidth, queryCount: queryCount,
                                    keys: kp.baseAddress!, keyStride: width, values: vp.baseAddress!, valueStride: width, keyCount: keyCount,
                                    keyValueType: cells.storage,
                                    heads: c.attentionHeads, keyValueHeads: c.keyValueHeads, headDimension: c.headDimension,
                                    scale: 1 / Float(c.headDimension).squareRoot(), mask: mask,
                                    output: op.baseAddress! + tokens.lowerBound * queryWidth, outputStride: queryWidth,
                                    probabilities: recordWeights ? wp.baseAddress : nil)
                            }
                        }
                    }
                }
            }
            if recordWeights { observation.attentionWeights[l, default: [:]][s] = weightsOut }
            cells.compactNewest(writes: writes, width: width)
            swap(&cells, &cache.layers[l][s])
        }
        var hidden = x
        hidden += product(attended, weights.outputProjection)
        let normed2 = rmsNorm(hidden, weight: weights.postAttentionNorm, epsilon: c.rmsNormEpsilon)
        let gated = siluGate(product(normed2, weights.gateProjection), product(normed2, weights.upProjection))
        hidden += product(gated, weights.downProjection)
        return hidden
    }

    /// Final RMSNorm of `hidden` `[N, H]`.
    public func finalNormed(_ hidden: Matrix) -> Matrix {
        rmsNorm(hidden, weight: finalNorm, epsilon: configuration.rmsNormEpsilon)
    }

    /// Logits `[N, V]` for hidden states `[N, H]`, one row per sequence's last token (final
    /// norm applied here). A row's logits do not depend on the others (`linear` is row-invariant).
    public func logits(_ hidden: Matrix) -> Matrix {
        linear(finalNormed(hidden), languageModelHead)
    }
}
