// Generation for requests in the inference modes of docs/DYNAMIC_LLAVA.md section 4: full
// context, Dynamic-LLaVA (image pruning at the sparse layer and the output-text gate on the KV
// cache), decoding without a KV cache, and the FastV and random baselines. Every row owns its
// KV-cache sequence, sampler and decisions, so a batch of N gives each row exactly what it gets
// alone. The step-driven loop is `GenerationBatch`; the stages live beside this file: Prefill,
// Decode, Recompute, StopRules, FlopCounting, and the snapshot conversion in GenerationSnapshot.
import Foundation
import Llama
import Numerics
import SafeTensors
import Sparsification

/// Runs requests on a model.
public struct Generator: Sendable {
    public let model: LLaVAModel
    /// Turns generated ids into text (stop strings and `text` need it); nil leaves `text` empty.
    public var detokenize: (@Sendable ([Int32]) -> String)?
    /// Keep every step's raw logits and the output gate's logits in the result (parity tests).
    public var recordsLogits = false

    public init(model: LLaVAModel, detokenize: (@Sendable ([Int32]) -> String)? = nil) {
        self.model = model
        self.detokenize = detokenize
    }

    /// Per-request state during generation; lives in a `GenerationBatch`, never on the model.
    struct RequestState {
        let request: GenerationRequest
        /// The request's sequence in the batch's KV cache.
        var sequence: Int
        var sampler: Sampler
        /// `[n, H]` prompt embeddings (text | image | text); nil for a request resumed from a
        /// snapshot, which has a KV cache and never needs them.
        var promptEmbeddings: Matrix?
        /// `n`: tokens of the unpruned prompt.
        var promptLength: Int
        /// Where the image sits in the prompt.
        var imageSpan: Range<Int>?
        /// Prompt tokens whose cells came from the prefix cache at prefill (0: none); `promptEmbeddings` then holds
        /// only the tokens after them.
        var cachedPrefixLength = 0
        var result = GenerationResult()
        var finished = false
        /// Decode steps run, counting those before a resume.
        var decodeSteps = 0
        /// Prefix tokens still to be fed instead of sampled.
        var forced: [Int32] = []

        var parameters: GenerationParameters { request.parameters }
        var sparsity: SparsityParameters { request.parameters.sparsity }
        var nextPosition: Int32 { Int32(promptLength + result.tokenIDs.count - 1) }
    }

    /// Generates for every request; row `i` of the result belongs to `requests[i]`: a
    /// `GenerationBatch` that takes them all at once and steps until every row has finished.
    public func generate(_ requests: [GenerationRequest]) throws(GenerationError) -> [GenerationResult] {
        var batch = GenerationBatch(generator: self)
        let rows = try batch.add(requests)
        while !batch.generating.isEmpty { batch.step() }
        return rows.map { batch.remove($0) }
    }

    /// Validates a batch before any work is done.
    public func validate(_ requests: [GenerationRequest]) throws(GenerationError) {
        let c = model.language.configuration, vision = model.vision.configuration
        let pixelCount = vision.channels * vision.imageSize * vision.imageSize
        for (r, request) in requests.enumerated() {
            for id in request.idsBeforeImage + request.idsAfterImage + request.generatedPrefix where id < 0 || Int(id) >= c.vocabularySize {
                throw .tokenOutOfVocabulary(request: r, id: id, vocabulary: c.vocabularySize)
            }
            if let pixels = request.pixelValues, pixels.count != pixelCount {
                throw .wrongPixelCount(request: r, found: pixels.count, expected: pixelCount)
            }
            let length = promptLength(request) + request.generatedPrefix.count
            if length >= c.maxPositionEmbeddings {
                throw .promptTooLong(request: r, tokens: length, context: c.maxPositionEmbeddings)
            }
            let sparsity = request.parameters.sparsity
            if let rate = sparsity.visionKeepRate, !(rate > 0 && rate <= 1) {
                throw .sparsityUnavailable(request: r, reason: "vision keep rate \(rate) is not in (0, 1]")
            }
            if let rate = sparsity.outputKeepRate, !(rate >= 0 && rate <= 1) {
                throw .sparsityUnavailable(request: r, reason: "output keep rate \(rate) is not in [0, 1]")
            }
            if sparsity.outputTokens != .learned, !(sparsity.mode == .dynamic && sparsity.usesKeyValueCache) {
                throw .sparsityUnavailable(request: r, reason: "the \(sparsity.outputTokens.rawValue) output-token rule needs dynamic sparsity with a KV cache")
            }
            switch sparsity.mode {
            case .dynamic:
                guard let sparse = model.sparse else {
                    throw .sparsityUnavailable(request: r, reason: "dynamic sparsity needs a Dynamic-LLaVA checkpoint (config.json has no sparse_config)")
                }
                for error in [sparse.imagePredictor.error, sparse.outputTextPredictor.error].compactMap({ $0 }) {
                    throw .sparsityUnavailable(request: r, reason: "dynamic sparsity needs the predictors: \(error.description)")
                }
            case .fastv:
                guard (1..<c.hiddenLayers).contains(sparsity.fastVLayer) else {
                    throw .sparsityUnavailable(request: r, reason: "FastV layer \(sparsity.fastVLayer) is outside 1..<\(c.hiddenLayers)")
                }
            case .full, .random:
                break
            }
        }
    }

    func promptLength(_ request: GenerationRequest) -> Int {
        request.idsBeforeImage.count + (request.pixelValues == nil ? 0 : model.vision.configuration.patchCount) + request.idsAfterImage.count
    }

    // MARK: Defaults: the one place where what a request leaves open is decided.

    /// The sparsity mode of a request or job that names none: Dynamic-LLaVA on a Dynamic-LLaVA
    /// checkpoint, full context otherwise.
    public var defaultSparsityMode: SparsityMode { model.sparse == nil ? .full : .dynamic }

    /// The sparse layer `l`: where the predictors read and pruning applies (random too).
    var sparseLayer: Int { model.sparse?.configuration.sparseLayer ?? 2 }

    /// The layer from which a mode runs on pruned tokens (the layer count: never), and the layers
    /// whose attention weights the pruning reads (FastV: K-1).
    func pruningLayer(_ sparsity: SparsityParameters) -> (layer: Int, observedAttention: Set<Int>) {
        switch sparsity.mode {
        case .full: return (model.language.layerCount, [])
        case .dynamic, .random: return (sparseLayer, [])
        case .fastv: return (sparsity.fastVLayer, [sparsity.fastVLayer - 1])
        }
    }

    /// Image tokens kept by a request's mode (`patchCount` for full context): dynamic and random
    /// keep sparse_config's vision_keep_rate (0.2 without one), FastV keeps 1 - 0.75 by default
    /// (its paper's R = 75%); an explicit `visionKeepRate` overrides both.
    func keptImageCount(_ sparsity: SparsityParameters) -> Int {
        let n = model.vision.configuration.patchCount
        switch sparsity.mode {
        case .full: return n
        case .dynamic, .random: return Int(Double(n) * (sparsity.visionKeepRate ?? model.sparse?.configuration.visionKeepRate ?? 0.2))
        case .fastv: return Int((Double(n) * (sparsity.visionKeepRate ?? 0.25)).rounded())
        }
    }

    /// The keep probability of the random output-token rule: the request's, else sparse_config's
    /// output_text_keep_rate, else one half.
    func outputKeepRate(_ sparsity: SparsityParameters) -> Double {
        sparsity.outputKeepRate ?? model.sparse?.configuration.outputTextKeepRate ?? 0.5
    }
}

func milliseconds(since start: DispatchTime) -> Double {
    Double(DispatchTime.now().uptimeNanoseconds - start.uptimeNanoseconds) / 1e6
}

extension Result {
    var error: Failure? {
        if case .failure(let error) = self { return error }
        return nil
    }
}
