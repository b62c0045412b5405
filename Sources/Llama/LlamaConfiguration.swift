import Numerics

/// `LlamaConfig` fields (transformers' defaults where a config.json leaves one out).
public struct LlamaConfiguration: Decodable, Sendable, Equatable {
    public var vocabularySize: Int
    public var hiddenSize: Int
    public var intermediateSize: Int
    public var hiddenLayers: Int
    public var attentionHeads: Int
    public var keyValueHeads: Int
    public var rmsNormEpsilon: Float
    public var ropeTheta: Float
    public var maxPositionEmbeddings: Int
    public var tieWordEmbeddings: Bool

    enum CodingKeys: String, CodingKey {
        case vocabularySize = "vocab_size", hiddenSize = "hidden_size", intermediateSize = "intermediate_size"
        case hiddenLayers = "num_hidden_layers", attentionHeads = "num_attention_heads"
        case keyValueHeads = "num_key_value_heads", rmsNormEpsilon = "rms_norm_eps", ropeTheta = "rope_theta"
        case maxPositionEmbeddings = "max_position_embeddings", tieWordEmbeddings = "tie_word_embeddings"
        case ropeScaling = "rope_scaling", hiddenActivation = "hidden_act", headDimension = "head_dim"
    }

    public init(vocabularySize: Int = 32000, hiddenSize: Int = 4096, intermediateSize: Int = 11008, hiddenLayers: Int = 32,
                attentionHeads: Int = 32, keyValueHeads: Int? = nil, rmsNormEpsilon: Float = 1e-6, ropeTheta: Float = 10000,
                maxPositionEmbeddings: Int = 2048, tieWordEmbeddings: Bool = false) {
        self.vocabularySize = vocabularySize
        self.hiddenSize = hiddenSize
        self.intermediateSize = intermediateSize
        self.hiddenLayers = hiddenLayers
        self.attentionHeads = attentionHeads
        self.keyValueHeads = keyValueHeads ?? attentionHeads
        self.rmsNormEpsilon = rmsNormEpsilon
        self.ropeTheta = ropeTheta
        self.maxPositionEmbeddings = maxPositionEmbeddings
        self.tieWordEmbeddings = tieWordEmbeddings
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        let d = LlamaConfiguration()
        vocabularySize = try c.decodeIfPresent(Int.self, forKey: .vocabularySize) ?? d.vocabularySize
        hiddenSize = try c.decodeIfPresent(Int.self, forKey: .hiddenSize) ?? d.hiddenSize
        intermediateSize = try c.decodeIfPresent(Int.self, forKey: .intermediateSize) ?? d.intermediateSize
        hiddenLayers = try c.decodeIfPresent(Int.self, forKey: .hiddenLayers) ?? d.hiddenLayers
        attentionHeads = try c.decodeIfPresent(Int.self, forKey: .attentionHeads) ?? d.attentionHeads
        keyValueHeads = try c.decodeIfPresent(Int.self, forKey: .keyValueHeads) ?? attentionHeads
        rmsNormEpsilon = try c.decodeIfPresent(Float.self, forKey: .rmsNormEpsilon) ?? d.rmsNormEpsilon
        ropeTheta = try c.decodeIfPresent(Float.self, forKey: .ropeTheta) ?? d.ropeTheta
        maxPositionEmbeddings = try c.decodeIfPresent(Int.self, forKey: .maxPositionEmbeddings) ?? d.maxPositionEmbeddings
        tieWordEmbeddings = try c.decodeIfPresent(Bool.self, forKey: .tieWordEmbeddings) ?? d.tieWordEmbeddings
        // Fail on what this engine does not compute rather than computing something else.
        if let scaling = try? c.decodeIfPresent([String: JSONScalar].self, forKey: .ropeScaling), !scaling.isEmpty {
            throw DecodingError.dataCorruptedError(forKey: .ropeScaling, in: c, debugDescription: "rope_scaling is not supported")
        }
        if let activation = try c.decodeIfPresent(String.self, forKey: .hiddenActivation), activation != "silu" {
            throw DecodingError.dataCorruptedError(forKey: .hiddenActivation, in: c, debugDescription: "hidden_act \(activation) is not supported (silu only)")
        }
        if let headDimension = try c.decodeIfPresent(Int.self, forKey: .headDimension), headDimension != hiddenSize / attentionHeads {
            throw DecodingError.dataCorruptedError(forKey: .headDimension, in: c, debugDescription: "head_dim \(headDimension) differs from hidden_size / num_attention_heads")
        }
    }

    public var headDimension: Int { hiddenSize / attentionHeads }
    /// Width of one token's keys (or values): `keyValueHeads * headDimension`.
    public var keyValueWidth: Int { keyValueHeads * headDimension }
}

/// A JSON value that is null, a number, a string or a bool: enough to notice that
/// `rope_scaling` is set without modelling it.
enum JSONScalar: Decodable {
    case null, number(Double), string(String), bool(Bool)

    init(from decoder: Decoder) throws {
        let c = try decoder.singleValueContainer()
        if c.decodeNil() { self = .null }
        else if let b = try? c.decode(Bool.self) { self = .bool(b) }
        else if let n = try? c.decode(Double.self) { self = .number(n) }
        else { self = .string(try c.decode(String.self)) }
    }
}
