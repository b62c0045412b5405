// Generation for a batch of requests in the inference modes of DYNAMIC_LLAVA.md section 4: full
// context, Dynamic-LLaVA (image pruning at the sparse layer and the output-text gate on the KV
// cache), decoding without a KV cache, and the FastV and random baselines. Every row owns its
// KV-cache sequence, sampler and decisions, so a batch of N gives each row exactly what it gets
// alone.
import Foundation
import Llama
import Numerics
import SafeTensors
import Sparsification

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
    public var maxTokens: Int = 256
    public var sampling = SamplingParameters()
    /// Generation ends when the decoded text contains one of these (the text is cut before it).
    public var stop: [String] = []
    /// Top-K log-probabilities to report per generated token (0 = none).
    public var logprobs: Int = 0
    /// Generation ends after this token (included in `tokenIDs`, not in the text); nil = never.
    public var endOfSequence: Int32? = nil
    public var sparsity = SparsityParameters()

    public init(maxTokens: Int = 256, sampling: SamplingParameters = SamplingParameters(), stop: [String] = [],
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
    /// Largest K/V footprint (f32 bytes) the request's cache reached.
    public var kvBytesPeak = 0
    /// The matrix products' arithmetic (`Kernels.precision`); absent in files written before it
    /// was recorded.
    public var precision: Precision?

    enum CodingKeys: String, CodingKey {
        case promptTokens = "prompt_tokens", imageTokensTotal = "image_tokens_total", imageTokensKept = "image_tokens_kept"
        case kvCellsPerLayer = "kv_cells_per_layer", prefillMilliseconds = "prefill_ms", decodeMilliseconds = "decode_ms"
        case prefillFlops = "prefill_flops", decodeFlops = "decode_flops", kvBytesPeak = "kv_bytes_peak"
        case precision
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

/// Where a batch stands, reported after prefill (step 0) and after every decode step.
public struct DecodeProgress: Sendable, Equatable {
    /// Decode steps run by this `generate` call.
    public var step: Int
    /// Requests (indices into the batch) still generating.
    public var generating: [Int]
    /// Requests that reached a stop rule in this step (prefill included).
    public var finished: [Int]
    /// Tokens the batch produced in this step.
    public var newTokens: Int
}

/// What the observer wants done before the next decode step.
public struct DecodeDirective: Sendable, Equatable {
    /// Requests whose state to capture now (generating or just finished; rows with a KV cache only).
    public var snapshot: Set<Int>
    /// Generating requests that leave the batch now: their cells are dropped and `generate` returns
    /// nil for them. Their batch-mates go on unchanged.
    public var remove: Set<Int>

    public init(snapshot: Set<Int> = [], remove: Set<Int> = []) {
        self.snapshot = snapshot
        self.remove = remove
    }
}

/// The per-step hook of `generate`: snapshots, graceful stop and cancellation all go through it.
public struct DecodeObserver {
    public var afterStep: (DecodeProgress) -> DecodeDirective
    /// Receives each snapshot the directive asked for, with its request index.
    public var captured: (Int, GenerationSnapshot) -> Void

    public init(afterStep: @escaping (DecodeProgress) -> DecodeDirective, captured: @escaping (Int, GenerationSnapshot) -> Void) {
        self.afterStep = afterStep
        self.captured = captured
    }
}

/// Runs batches of requests on a model.
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

    /// Per-request state during generation; lives here, never on the model.
    struct RequestState {
        let request: GenerationRequest
        var sequence: Int
        var sampler: Sampler
        /// `[n, H]` prompt embeddings (text | image | text); nil for a request resumed from a
        /// snapshot, which has a KV cache and never needs them.
        var promptEmbeddings: Matrix?
        /// `n`: tokens of the unpruned prompt.
        var promptLength: Int
        /// Where the image sits in the prompt.
        var imageSpan: Range<Int>?
        var result = GenerationResult()
        var finished = false
        /// Left the batch at the observer's request: no result.
        var removed = false
        /// Decode steps run, counting those before a resume.
        var decodeSteps = 0
        /// Prefix tokens still to be fed instead of sampled.
        var forced: [Int32] = []

        var parameters: GenerationParameters { request.parameters }
        var sparsity: SparsityParameters { request.parameters.sparsity }
        var nextPosition: Int32 { Int32(promptLength + result.tokenIDs.count - 1) }
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

    /// Image tokens kept by a request's mode (`patchCount` for full context).
    func keptImageCount(_ sparsity: SparsityParameters) -> Int {
        let n = model.vision.configuration.patchCount
        switch sparsity.mode {
        case .full: return n
        case .dynamic, .random: return Int(Double(n) * (sparsity.visionKeepRate ?? model.sparse?.configuration.visionKeepRate ?? 0.2))
        case .fastv: return Int((Double(n) * (sparsity.visionKeepRate ?? 0.25)).rounded())
        }
    }

    /// Generates for every request; row `i` of the result belongs to `requests[i]`.
    public func generate(_ requests: [GenerationRequest]) throws(GenerationError) -> [GenerationResult] {
        try generate(requests, resuming: Array(repeating: nil, count: requests.count), observer: nil).map { $0! }
    }

    /// Generates for every request, request `i` going on from `snapshots[i]` when given (no vision,
    /// no prefill: its cells, tokens and sampler are restored). `observer` is consulted after
    /// prefill and after every decode step; a request it removes gets nil.
    public func generate(_ requests: [GenerationRequest], resuming snapshots: [GenerationSnapshot?],
                         observer: DecodeObserver?) throws(GenerationError) -> [GenerationResult?] {
        precondition(snapshots.count == requests.count, "one snapshot slot per request")
        try validate(requests)
        for (r, snapshot) in snapshots.enumerated() {
            if let snapshot { try checkSnapshot(snapshot, fits: requests[r], request: r) }
        }
        let language = model.language, c = language.configuration
        var cache = KeyValueCache(layers: c.hiddenLayers, sequences: requests.count, keyValueWidth: c.keyValueWidth)
        var states: [RequestState] = []

        // Prefill, one request at a time (a prompt is never multiplied together with another).
        for (r, request) in requests.enumerated() {
            if let snapshot = snapshots[r] {
                states.append(resumedState(request, from: snapshot, sequence: r, cache: &cache))
            } else {
                states.append(prefilledState(request, sequence: r, cache: &cache))
            }
        }

        var reported = Set<Int>()
        /// Hands the observer the batch's progress, then captures and removes what it asks for.
        func consult(step: Int, newTokens: Int) {
            guard let observer else { return }
            let finished = states.indices.filter { states[$0].finished && !states[$0].removed && !reported.contains($0) }
            reported.formUnion(finished)
            let generating = states.indices.filter { !states[$0].finished }
            let directive = observer.afterStep(DecodeProgress(step: step, generating: generating, finished: finished, newTokens: newTokens))
            for r in directive.snapshot.sorted() where !states[r].removed && states[r].sparsity.usesKeyValueCache {
                observer.captured(r, snapshot(of: states[r], cache: cache))
            }
            for r in directive.remove.sorted() where !states[r].finished {
                states[r].finished = true
                states[r].removed = true
                for l in cache.layers.indices { cache.layers[l][states[r].sequence] = SequenceCells() }
            }
        }
        consult(step: 0, newTokens: snapshots.filter { $0 == nil }.count)

        // Decode: one token per unfinished row per step; rows with a KV cache step together.
        var step = 0
        while true {
            let active = states.indices.filter { !states[$0].finished }
            if active.isEmpty { break }
            step += 1
            let cached = active.filter { states[$0].sparsity.usesKeyValueCache }
            if !cached.isEmpty {
                let start = DispatchTime.now()
                let (logits, gates) = decodeStep(cached.map { states[$0] }, cache: &cache)
                let elapsed = milliseconds(since: start)
                for (row, r) in cached.enumerated() {
                    states[r].decodeSteps += 1
                    states[r].result.stats.decodeMilliseconds += elapsed
                    if let gate = gates[row] { states[r].result.gateLogits.append(gate) }
                    let cells = cache.cellCounts(sequence: states[r].sequence)
                    states[r].result.stats.decodeFlops += decodeStepFlops(cells: cells, gated: gates[row] != nil)
                    states[r].result.stats.kvCellsPerLayer = cells
                    accept(logits.row(row), into: &states[r], cellsNow: cells)
                }
            }
            for r in active where !states[r].sparsity.usesKeyValueCache {
                let start = DispatchTime.now()
                var flops = 0
                let logits = recompute(&states[r], flops: &flops)
                states[r].decodeSteps += 1
                states[r].result.stats.decodeMilliseconds += milliseconds(since: start)
                states[r].result.stats.decodeFlops += flops
                accept(logits, into: &states[r], cellsNow: states[r].result.stats.kvCellsPerLayer)
            }
            consult(step: step, newTokens: active.count)
        }
        return states.map { $0.removed ? nil : $0.result }
    }

    /// Embeds a request's prompt (running the vision tower on its image), prefills its cells and
    /// takes its first token.
    func prefilledState(_ request: GenerationRequest, sequence r: Int, cache: inout KeyValueCache) -> RequestState {
        let language = model.language, c = language.configuration
        let start = DispatchTime.now()
        var imageSpan: Range<Int>?
        var parts = [language.embed(request.idsBeforeImage)]
        var flops = 2 * c.hiddenSize * c.vocabularySize
        if let pixels = request.pixelValues {
            parts.append(model.imageEmbeddings([pixels])[0])
            imageSpan = request.idsBeforeImage.count ..< request.idsBeforeImage.count + model.vision.configuration.patchCount
            flops += visionFlops()
        }
        parts.append(language.embed(request.idsAfterImage))
        let embeddings = Matrix.concatenateRows(parts)
        var state = RequestState(request: request, sequence: r, sampler: Sampler(request.parameters.sampling),
                                 promptEmbeddings: embeddings, promptLength: embeddings.rows, imageSpan: imageSpan)
        state.result.stats.promptTokens = embeddings.rows
        state.result.stats.precision = Kernels.precision
        state.result.stats.imageTokensTotal = imageSpan?.count ?? 0
        let logits: [Float]
        if state.sparsity.usesKeyValueCache {
            state.forced = request.generatedPrefix
            logits = prefill(&state, cache: &cache, flops: &flops)
            state.result.stats.kvCellsPerLayer = cache.cellCounts(sequence: r)
        } else {
            // Recomputing needs no replay: the prefix is simply part of the sequence.
            state.result.tokenIDs = request.generatedPrefix
            logits = recompute(&state, flops: &flops)
        }
        state.result.stats.prefillMilliseconds = milliseconds(since: start)
        state.result.stats.prefillFlops = flops
        accept(logits, into: &state, cellsNow: state.result.stats.kvCellsPerLayer)
        return state
    }

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

    /// Runs a request's prompt through every layer, pruning image tokens as its mode says, and
    /// leaves its cells in `cache`. Returns the logits of the last prompt token.
    func prefill(_ state: inout RequestState, cache: inout KeyValueCache, flops: inout Int) -> [Float] {
        let language = model.language, layerCount = language.layerCount
        guard let embeddings = state.promptEmbeddings else { preconditionFailure("a prefilled request has its embeddings") }
        let n = embeddings.rows
        var hidden = embeddings
        var batch = TokenBatch(positions: (0..<Int32(n)).map { $0 }, sequences: Array(repeating: state.sequence, count: n))
        let (split, observed) = pruningLayer(state.sparsity)
        var observation = ForwardObservation(attentionLayers: observed)
        let keptCount = keptImageCount(state.sparsity)
        language.forward(&hidden, batch: batch, layers: 0..<split, cache: &cache, observation: &observation)
        state.result.stats.imageTokensKept = state.imageSpan?.count ?? 0
        if split < layerCount {
            if let imageSpan = state.imageSpan {
                let kept = keptImageTokens(state, sequence: state.sequence, imageSpan: imageSpan, count: keptCount,
                                           hiddenAtSplit: hidden, observation: observation, flops: &flops)
                let selection = Array(0..<imageSpan.lowerBound) + kept.map { imageSpan.lowerBound + $0 } + Array(imageSpan.upperBound..<n)
                hidden = hidden.gatherRows(selection)
                batch = batch.selecting(selection)
                state.result.stats.imageTokensKept = kept.count
                state.result.keptImageIndices = kept
            }
            language.forward(&hidden, batch: batch, layers: split..<layerCount, cache: &cache, observation: &observation)
        }
        flops += observation.flops
        return language.logits(hidden.rows((hidden.rows - 1)..<hidden.rows)).row(0)
    }

    /// The image tokens (indices into the image span, ascending) a request keeps.
    /// `sequence` names the cache sequence whose attention FastV reads; the last prompt token is
    /// `state.promptLength - 1`.
    func keptImageTokens(_ state: RequestState, sequence: Int, imageSpan: Range<Int>, count: Int, hiddenAtSplit: Matrix,
                         observation: ForwardObservation, flops: inout Int) -> [Int] {
        switch state.sparsity.mode {
        case .full:
            return Array(0..<imageSpan.count)
        case .dynamic:
            guard case .success(let predictor)? = model.sparse?.imagePredictor else { preconditionFailure("validated") }
            let logits = predictor.logits(hiddenAtSplit.rows(imageSpan))
            flops += predictor.flops(tokens: imageSpan.count)
            return KeepRules.topImageTokens(logits: logits, k: count)
        case .random:
            return KeepRules.randomImageTokens(count: imageSpan.count, k: count, seed: state.parameters.sampling.seed)
        case .fastv:
            let layer = state.sparsity.fastVLayer - 1
            guard let weights = observation.attentionWeights[layer]?[sequence] else { preconditionFailure("FastV weights recorded") }
            let tokens = hiddenAtSplit.rows
            return KeepRules.fastVImageTokens(weights: weights, heads: model.language.configuration.attentionHeads, queries: tokens, keys: tokens,
                                              query: state.promptLength - 1, imageKeys: imageSpan, k: count)
        }
    }

    /// One decode step for rows with a KV cache: each feeds its last generated token. A dynamic
    /// row's output-text gate, read at the sparse layer, decides whether the token's K/V enter
    /// the cache of layers >= l; the token always attends to itself and reaches the LM head.
    /// Returns the logits `[rows, V]` and, per row, the gate logits (dynamic rows only).
    func decodeStep(_ rows: [RequestState], cache: inout KeyValueCache) -> (Matrix, [[Float]?]) {
        let language = model.language, layerCount = language.layerCount
        var hidden = language.embed(rows.map { $0.result.tokenIDs.last! })
        var batch = TokenBatch(positions: rows.map(\.nextPosition), sequences: rows.map(\.sequence))
        var observation = ForwardObservation()
        var gates = [[Float]?](repeating: nil, count: rows.count)
        let gated = rows.indices.filter { rows[$0].sparsity.mode == .dynamic }
        if gated.isEmpty {
            language.forward(&hidden, batch: batch, layers: 0..<layerCount, cache: &cache, observation: &observation)
        } else {
            let l = sparseLayer
            language.forward(&hidden, batch: batch, layers: 0..<l, cache: &cache, observation: &observation)
            guard case .success(let predictor)? = model.sparse?.outputTextPredictor else { preconditionFailure("validated") }
            let logits = predictor.logits(hidden.gatherRows(gated))
            for (i, row) in gated.enumerated() {
                gates[row] = logits.row(i)
                batch.writesKeyValue[row] = keepsOutputToken(rows[row], gateLogits: logits.row(i))
            }
            language.forward(&hidden, batch: batch, layers: l..<layerCount, cache: &cache, observation: &observation)
        }
        return (language.logits(hidden), gates)
    }

    /// Whether the token a dynamic row feeds now enters the cache of layers >= l, by the row's
    /// output-token rule (the gate's logits are read, and reported, whatever the rule).
    func keepsOutputToken(_ state: RequestState, gateLogits: [Float]) -> Bool {
        switch state.sparsity.outputTokens {
        case .learned:
            return KeepRules.keepsOutputToken(gateLogits)
        case .random:
            let rate = state.sparsity.outputKeepRate ?? model.sparse?.configuration.outputTextKeepRate ?? 0.5
            return KeepRules.randomOutputToken(seed: state.parameters.sampling.seed, position: state.nextPosition, keepRate: rate)
        case .everyOther:
            return KeepRules.everyOtherOutputToken(generatedIndex: state.result.tokenIDs.count - 1)
        }
    }

    /// Decoding without a KV cache: the whole sequence (prompt and every generated token) runs
    /// again through a fresh cache. Image tokens are pruned as in prefill; for a dynamic row the
    /// generated tokens other than the newest are gated at the sparse layer, and the row keeps the
    /// `k` with the highest raw logit0, `k` = its own count of logit0 > logit1 (we differ from the
    /// reference's batch maximum, so that a row's result does not depend on its batch-mates).
    /// Prompt tokens and the newest token are always kept; positions stay the original ones.
    /// Returns the newest token's logits.
    func recompute(_ state: inout RequestState, flops: inout Int) -> [Float] {
        let language = model.language, c = language.configuration, layerCount = language.layerCount
        guard let embeddings = state.promptEmbeddings else { preconditionFailure("a request without a KV cache is never resumed") }
        let n = embeddings.rows, generated = state.result.tokenIDs.count
        var hidden = Matrix.concatenateRows([embeddings, language.embed(state.result.tokenIDs)])
        let total = n + generated
        var batch = TokenBatch(positions: (0..<Int32(total)).map { $0 }, sequences: Array(repeating: 0, count: total))
        var cache = KeyValueCache(layers: c.hiddenLayers, sequences: 1, keyValueWidth: c.keyValueWidth)
        let (split, observed) = pruningLayer(state.sparsity)
        var observation = ForwardObservation(attentionLayers: observed)
        // The newest token's hidden state is what predicts the next one.
        language.forward(&hidden, batch: batch, layers: 0..<split, cache: &cache, observation: &observation)
        state.result.stats.imageTokensKept = state.imageSpan?.count ?? 0
        if split < layerCount {
            var selection = Array(0..<n)
            if let imageSpan = state.imageSpan {
                let kept = keptImageTokens(state, sequence: 0, imageSpan: imageSpan, count: keptImageCount(state.sparsity),
                                           hiddenAtSplit: hidden, observation: observation, flops: &flops)
                selection = Array(0..<imageSpan.lowerBound) + kept.map { imageSpan.lowerBound + $0 } + Array(imageSpan.upperBound..<n)
                state.result.stats.imageTokensKept = kept.count
                state.result.keptImageIndices = kept
            }
            var keptGenerated: [Int] = []
            if state.sparsity.mode == .dynamic && generated > 1 {
                guard case .success(let predictor)? = model.sparse?.outputTextPredictor else { preconditionFailure("validated") }
                let candidates = Array(n ..< total - 1)
                let logits = predictor.logits(hidden.gatherRows(candidates))
                let k = (0..<logits.rows).filter { KeepRules.keepsOutputToken(logits.row($0)) }.count
                keptGenerated = KeepRules.topIndices((0..<logits.rows).map { logits.values[$0 * 2] }, k: k).map { n + $0 }
                flops += predictor.flops(tokens: candidates.count)
            } else if generated > 1 {
                keptGenerated = Array(n ..< total - 1)
            }
            if generated > 0 { selection += keptGenerated + [total - 1] }
            if state.sparsity.mode == .dynamic { state.result.keptGeneratedIndices.append(keptGenerated.map { $0 - n }) }
            hidden = hidden.gatherRows(selection)
            batch = batch.selecting(selection)
            language.forward(&hidden, batch: batch, layers: split..<layerCount, cache: &cache, observation: &observation)
        }
        flops += observation.flops + 2 * c.hiddenSize * c.vocabularySize
        state.result.stats.kvCellsPerLayer = cache.cellCounts(sequence: 0)
        return language.logits(hidden.rows((hidden.rows - 1)..<hidden.rows)).row(0)
    }

    /// Takes one step's logits for a row: logprobs, sampling, stop rules, accounting.
    func accept(_ logits: [Float], into state: inout RequestState, cellsNow: [Int]) {
        let parameters = state.parameters
        let bytes = cellsNow.reduce(0, +) * model.language.configuration.keyValueWidth * 2 * 4
        state.result.stats.kvBytesPeak = max(state.result.stats.kvBytesPeak, bytes)
        if !state.forced.isEmpty {
            state.result.tokenIDs.append(state.forced.removeFirst())
            if state.forced.isEmpty && state.result.tokenIDs.count >= parameters.maxTokens { finish(&state, .length) }
            return
        }
        if recordsLogits { state.result.stepLogits.append(logits) }
        if parameters.logprobs > 0 { state.result.logprobs.append(topLogprobs(logits, k: parameters.logprobs)) }
        let token = state.sampler.sample(logits)
        state.result.tokenIDs.append(token)

        // Stop strings need the text at every step; without them it is decoded once, at the end
        // (decoding the whole text every step is quadratic in the length).
        if let detokenize, !parameters.stop.isEmpty {
            let text = detokenize(token == parameters.endOfSequence ? Array(state.result.tokenIDs.dropLast()) : state.result.tokenIDs)
            if let cut = parameters.stop.compactMap({ text.range(of: $0)?.lowerBound }).min() {
                state.result.text = String(text[..<cut])
                state.result.finishReason = .stop
                state.finished = true
                return
            }
        }
        if token == parameters.endOfSequence {
            finish(&state, .stop)
        } else if state.result.tokenIDs.count >= parameters.maxTokens || Int(state.nextPosition) >= model.language.configuration.maxPositionEmbeddings {
            finish(&state, .length)
        }
    }

    /// Ends a request: its reason, and its text decoded from the generated ids (the end-of-sequence
    /// token excluded).
    func finish(_ state: inout RequestState, _ reason: FinishReason) {
        state.result.finishReason = reason
        state.finished = true
        if let detokenize {
            let ids = state.result.tokenIDs
            state.result.text = detokenize(ids.last == state.parameters.endOfSequence ? Array(ids.dropLast()) : ids)
        }
    }

    /// Multiply-adds x2 of the vision tower and projector for one image.
    func visionFlops() -> Int {
        let v = model.vision.configuration, h = model.language.configuration.hiddenSize
        let tokens = v.patchCount + 1, d = v.hiddenSize
        let perLayer = 2 * tokens * d * d * 4 + 2 * 2 * tokens * tokens * d + 2 * 2 * tokens * d * v.intermediateSize
        return 2 * v.patchCount * d * v.channels * v.patchSize * v.patchSize + model.vision.layerCount * perLayer
            + 2 * v.patchCount * (d * h + h * h)
    }

    /// Multiply-adds x2 of one decode step for one row, given its cells per layer after the step
    /// (a token that did not enter a layer's cache still attended to itself there).
    func decodeStepFlops(cells: [Int], gated: Bool) -> Int {
        let c = model.language.configuration
        let h = c.hiddenSize, q = c.attentionHeads * c.headDimension
        let projections = 2 * h * (q + 2 * c.keyValueWidth) + 2 * q * h + 3 * 2 * h * c.intermediateSize
        let attention = cells.reduce(0) { $0 + 2 * 2 * q * $1 }
        var total = c.hiddenLayers * projections + attention + 2 * h * c.vocabularySize
        if gated, case .success(let predictor)? = model.sparse?.outputTextPredictor { total += predictor.flops(tokens: 1) }
        return total
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
