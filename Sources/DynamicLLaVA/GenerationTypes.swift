// What a generation request asks for and what it gets back: the request, its parameters and
// sparsity, the result with its statistics, and the errors that refuse a request. The defaults a
// request leaves open (keep rates, sparsity mode) are resolved in one place, `Generator`'s
// "Defaults" section.
import Foundation
import Numerics

/// One sample: the prompt split at the image slot, and the image's pixels.
public struct GenerationRequest: Sendable {
    /// Token ids before the image (BOS first).
    public var idsBeforeImage: [Int32]
    /// `[3, S, S]` normalised pixels, or nil for a text-only prompt.
    public var pixelValues: [Float]?
    /// Token ids after the image.
    public var idsAfterImage: [Int32]
    public var parameters: GenerationParameters
    /// Tokens already generated (a resumed job): they are fed, not sampled, and generation goes
    /// on after them; they count towards `maxTokens` and appear in `tokenIDs`.
    public var generatedPrefix: [Int32]

    public init(idsBeforeImage: [Int32], pixelValues: [Float]?, idsAfterImage: [Int32], parameters: GenerationParameters,
                generatedPrefix: [Int32] = []) {
        self.idsBeforeImage = idsBeforeImage
        self.pixelValues = pixelValues
        self.idsAfterImage = idsAfterImage
        self.parameters = parameters
        self.generatedPrefix = generatedPrefix
    }
}

/// What to generate and when to stop.
public struct GenerationParameters: Sendable, Codable, Equatable {
    /// Tokens generated when a request or job does not say.
    public static let defaultMaxTokens = 256

    public var maxTokens: Int = defaultMaxTokens
    public var sampling = SamplingParameters()
    /// Generation ends when the decoded text contains one of these (the text is cut before it).
    public var stop: [String] = []
    /// Top-K log-probabilities to report per generated token (0 = none).
    public var logprobs: Int = 0
    /// Generation ends after this token (included in `tokenIDs`, not in the text); nil = never.
    public var endOfSequence: Int32? = nil
    public var sparsity = SparsityParameters()

    public init(maxTokens: Int = defaultMaxTokens, sampling: SamplingParameters = SamplingParameters(), stop: [String] = [],
                logprobs: Int = 0, endOfSequence: Int32? = nil, sparsity: SparsityParameters = SparsityParameters()) {
        self.maxTokens = maxTokens
        self.sampling = sampling
        self.stop = stop
        self.logprobs = logprobs
        self.endOfSequence = endOfSequence
        self.sparsity = sparsity
    }
}

/// Which context sparsification a request runs with.
public enum SparsityMode: String, Sendable, Codable, CaseIterable {
    /// Plain LLaVA-1.5: every token everywhere.
    case full
    /// Dynamic-LLaVA: the image predictor prunes image tokens at the sparse layer; the
    /// output-text predictor gates generated tokens' K/V (needs a Dynamic-LLaVA checkpoint).
    case dynamic
    /// FastV (training-free): image tokens pruned after layer K by the last prompt token's attention.
    case fastv
    /// Image tokens dropped uniformly at random (seeded by the sampling seed) at the sparse layer.
    case random
}

/// Which generated tokens' K/V enter the cache of layers >= l in dynamic mode. The baselines
/// exist to measure the learned gate against naive dropping at the same KV budget.
public enum OutputTokenRule: String, Sendable, Codable, CaseIterable {
    /// The output-text predictor: keep iff logit0 > logit1 (Dynamic-LLaVA).
    case learned
    /// Baseline: each token kept with probability `outputKeepRate`, drawn from the sampling seed
    /// and the token's position (so a row decides the same alone, in a batch, or resumed).
    case random
    /// Baseline: the 1st, 3rd, 5th, ... generated token kept, the others dropped.
    case everyOther = "every-other"
}

public struct SparsityParameters: Sendable, Codable, Equatable {
    public var mode: SparsityMode = .full
    /// Fraction of image tokens kept; nil = the mode's default (dynamic and random:
    /// sparse_config's vision_keep_rate, else 0.2; fastv: 1 - 0.75).
    public var visionKeepRate: Double? = nil
    /// false: recompute the whole sequence every step (DYNAMIC_LLAVA.md "decoding without KV cache").
    public var usesKeyValueCache = true
    /// FastV's K: the pruning reads layer K-1's attention and applies from layer K on.
    public var fastVLayer = 3
    /// Dynamic mode with a KV cache: the rule deciding which generated tokens' K/V are kept.
    public var outputTokens: OutputTokenRule = .learned
    /// `random` output tokens: the keep probability; nil = sparse_config's output_text_keep_rate.
    public var outputKeepRate: Double? = nil

    public init(mode: SparsityMode = .full, visionKeepRate: Double? = nil, usesKeyValueCache: Bool = true, fastVLayer: Int = 3,
                outputTokens: OutputTokenRule = .learned, outputKeepRate: Double? = nil) {
        self.mode = mode
        self.visionKeepRate = visionKeepRate
        self.usesKeyValueCache = usesKeyValueCache
        self.fastVLayer = fastVLayer
        self.outputTokens = outputTokens
        self.outputKeepRate = outputKeepRate
    }
}

public enum FinishReason: String, Sendable, Codable {
    /// End of sequence or a stop string.
    case stop
    /// `maxTokens` reached, or the context is full.
    case length
}

/// Per-request accounting, measured on the actual run.
public struct GenerationStats: Sendable, Codable, Equatable {
    public var promptTokens = 0
    public var imageTokensTotal = 0
    public var imageTokensKept = 0
    /// Cells per decoder layer at the end.
    public var kvCellsPerLayer: [Int] = []
    public var prefillMilliseconds = 0.0
    public var decodeMilliseconds = 0.0
    public var prefillFlops = 0
    public var decodeFlops = 0
    /// Largest K/V footprint (bytes, as the cache stores them: f32, or bf16 at bf16 precision) the request's cache reached.
    public var kvBytesPeak = 0
    /// The matrix products' arithmetic (`Kernels.precision`); absent in files written before it
    /// was recorded.
    public var precision: Precision?
    /// The image tokens kept at prefill (indices into the image's tokens, row-major over the patch grid, ascending),
    /// as `GenerationResult.keptImageIndices`; absent when none were dropped, and in files written before it was
    /// recorded. `dllava report` draws them over the image.
    public var keptImageIndices: [Int]?
    /// Prompt tokens (the text before the image and the image) whose K/V this request took from the image-prefix
    /// cache, computed for an earlier request about the same image: it ran neither the vision tower nor their
    /// prefill. Absent when it computed its whole prompt.
    public var cachedPrefixTokens: Int?
    /// Time spent packing weights for the kernels during this request's prefill (a fresh process packs each weight
    /// on its first product), not counted in `prefillMilliseconds`; absent when no weight was packed.
    public var packingMilliseconds: Double?
    /// Time to load the model (configuration, checkpoint memory-mapped, weights converted where their type needs it),
    /// when the caller loaded it for this request (`dllava generate`); absent otherwise.
    public var loadMilliseconds: Double?

    enum CodingKeys: String, CodingKey {
        case promptTokens = "prompt_tokens", imageTokensTotal = "image_tokens_total", imageTokensKept = "image_tokens_kept"
        case kvCellsPerLayer = "kv_cells_per_layer", prefillMilliseconds = "prefill_ms", decodeMilliseconds = "decode_ms"
        case prefillFlops = "prefill_flops", decodeFlops = "decode_flops", kvBytesPeak = "kv_bytes_peak"
        case precision, keptImageIndices = "kept_image_indices", cachedPrefixTokens = "cached_prefix_tokens"
        case packingMilliseconds = "packing_ms", loadMilliseconds = "load_ms"
    }
}

public struct GenerationResult: Sendable, Codable, Equatable {
    public var tokenIDs: [Int32] = []
    public var text = ""
    public var finishReason: FinishReason = .length
    /// Per generated token, the top-K `{id, logprob}` of the full distribution.
    public var logprobs: [[TokenLogprob]] = []
    /// Raw logits of every step (only when `Generator.recordsLogits`; parity tests read them).
    public var stepLogits: [[Float]] = []
    /// The output-text gate's logits per decode step with a KV cache (dynamic mode).
    public var gateLogits: [[Float]] = []
    /// Image tokens kept (indices into the image's tokens, ascending), when pruned.
    public var keptImageIndices: [Int]? = nil
    /// Without a KV cache (dynamic): per step, the generated tokens kept besides the newest.
    public var keptGeneratedIndices: [[Int]] = []
    public var stats = GenerationStats()

    enum CodingKeys: String, CodingKey {
        case tokenIDs = "token_ids", text, finishReason = "finish_reason", logprobs, stats
        case keptImageIndices = "kept_image_indices"
    }
}

/// Why a request cannot run. The description names the request (its index in the batch).
public enum GenerationError: Error, CustomStringConvertible, Equatable {
    case promptTooLong(request: Int, tokens: Int, context: Int)
    case tokenOutOfVocabulary(request: Int, id: Int32, vocabulary: Int)
    case wrongPixelCount(request: Int, found: Int, expected: Int)
    case sparsityUnavailable(request: Int, reason: String)
    /// A snapshot that is not this request's state on this model.
    case snapshotMismatch(request: Int, reason: String)

    public var description: String {
        switch self {
        case .promptTooLong(let r, let tokens, let context):
            return "request \(r): the prompt has \(tokens) tokens, more than the model's context of \(context)"
        case .tokenOutOfVocabulary(let r, let id, let vocabulary):
            return "request \(r): token id \(id) is outside the vocabulary of \(vocabulary)"
        case .wrongPixelCount(let r, let found, let expected):
            return "request \(r): \(found) pixel values, expected \(expected)"
        case .sparsityUnavailable(let r, let reason):
            return "request \(r): \(reason)"
        case .snapshotMismatch(let r, let reason):
            return "request \(r): the snapshot does not fit: \(reason)"
        }
    }

    /// 78 (configuration) when the model cannot run the requested mode, else 65 (bad input).
    public var exitCode: Int32 {
        if case .sparsityUnavailable = self { return 78 }
        return 65
    }
}
