// Full-context generation for a batch of requests (DYNAMIC_LLAVA.md section 1): prefill every
// row's [text | image | text] sequence packed without padding, then decode one token per active
// row per step. Every row owns its KV-cache sequence and sampler, so a batch of N gives each row
// exactly what it gets alone.
import Foundation
import Llama
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

    public init(idsBeforeImage: [Int32], pixelValues: [Float]?, idsAfterImage: [Int32], parameters: GenerationParameters) {
        self.idsBeforeImage = idsBeforeImage
        self.pixelValues = pixelValues
        self.idsAfterImage = idsAfterImage
        self.parameters = parameters
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

    public init(maxTokens: Int = 256, sampling: SamplingParameters = SamplingParameters(), stop: [String] = [],
                logprobs: Int = 0, endOfSequence: Int32? = nil) {
        self.maxTokens = maxTokens
        self.sampling = sampling
        self.stop = stop
        self.logprobs = logprobs
        self.endOfSequence = endOfSequence
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

    enum CodingKeys: String, CodingKey {
        case promptTokens = "prompt_tokens", imageTokensTotal = "image_tokens_total", imageTokensKept = "image_tokens_kept"
        case kvCellsPerLayer = "kv_cells_per_layer", prefillMilliseconds = "prefill_ms", decodeMilliseconds = "decode_ms"
        case prefillFlops = "prefill_flops", decodeFlops = "decode_flops", kvBytesPeak = "kv_bytes_peak"
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
    public var stats = GenerationStats()

    enum CodingKeys: String, CodingKey {
        case tokenIDs = "token_ids", text, finishReason = "finish_reason", logprobs, stats
    }
}

/// Why a request cannot run. The description names the request (its index in the batch).
public enum GenerationError: Error, CustomStringConvertible, Equatable {
    case promptTooLong(request: Int, tokens: Int, context: Int)
    case tokenOutOfVocabulary(request: Int, id: Int32, vocabulary: Int)
    case wrongPixelCount(request: Int, found: Int, expected: Int)

    public var description: String {
        switch self {
        case .promptTooLong(let r, let tokens, let context):
            return "request \(r): the prompt has \(tokens) tokens, more than the model's context of \(context)"
        case .tokenOutOfVocabulary(let r, let id, let vocabulary):
            return "request \(r): token id \(id) is outside the vocabulary of \(vocabulary)"
        case .wrongPixelCount(let r, let found, let expected):
            return "request \(r): \(found) pixel values, expected \(expected)"
        }
    }
}

/// Runs batches of requests on a model.
public struct Generator: Sendable {
    public let model: LLaVAModel
    /// Turns generated ids into text (stop strings and `text` need it); nil leaves `text` empty.
    public var detokenize: (@Sendable ([Int32]) -> String)?
    /// Keep every step's raw logits in the result (for parity tests).
    public var recordsLogits = false

    public init(model: LLaVAModel, detokenize: (@Sendable ([Int32]) -> String)? = nil) {
        self.model = model
        self.detokenize = detokenize
    }

    /// Per-request state during generation; lives here, never on the model.
    struct RequestState {
        var sequence: Int
        var nextPosition: Int32
        var sampler: Sampler
        var result = GenerationResult()
        var finished = false
    }

    /// Validates a batch before any work is done.
    public func validate(_ requests: [GenerationRequest]) throws(GenerationError) {
        let c = model.language.configuration, vision = model.vision.configuration
        let pixelCount = vision.channels * vision.imageSize * vision.imageSize
        for (r, request) in requests.enumerated() {
            for id in request.idsBeforeImage + request.idsAfterImage where id < 0 || Int(id) >= c.vocabularySize {
                throw .tokenOutOfVocabulary(request: r, id: id, vocabulary: c.vocabularySize)
            }
            if let pixels = request.pixelValues, pixels.count != pixelCount {
                throw .wrongPixelCount(request: r, found: pixels.count, expected: pixelCount)
            }
            let length = promptLength(request)
            if length >= c.maxPositionEmbeddings {
                throw .promptTooLong(request: r, tokens: length, context: c.maxPositionEmbeddings)
            }
        }
    }

    func promptLength(_ request: GenerationRequest) -> Int {
        request.idsBeforeImage.count + (request.pixelValues == nil ? 0 : model.vision.configuration.patchCount) + request.idsAfterImage.count
    }

    /// Generates for every request; row `i` of the result belongs to `requests[i]`.
    public func generate(_ requests: [GenerationRequest]) throws(GenerationError) -> [GenerationResult] {
        try validate(requests)
        let language = model.language, c = language.configuration
        var cache = KeyValueCache(layers: c.hiddenLayers, sequences: requests.count, keyValueWidth: c.keyValueWidth)
        var states = requests.enumerated().map { r, request in
            RequestState(sequence: r, nextPosition: Int32(promptLength(request)), sampler: Sampler(request.parameters.sampling))
        }

        // Prefill: every row's full prompt, packed.
        let prefillStart = DispatchTime.now()
        let images = model.imageEmbeddings(requests.compactMap(\.pixelValues))
        var imageIndex = 0
        var parts: [Matrix] = []
        var positions: [Int32] = [], sequences: [Int] = []
        for (r, request) in requests.enumerated() {
            parts.append(language.embed(request.idsBeforeImage))
            if request.pixelValues != nil {
                parts.append(images[imageIndex])
                imageIndex += 1
                states[r].result.stats.imageTokensTotal = model.vision.configuration.patchCount
                states[r].result.stats.imageTokensKept = model.vision.configuration.patchCount
            }
            parts.append(language.embed(request.idsAfterImage))
            let length = promptLength(request)
            positions += (0..<Int32(length))
            sequences += Array(repeating: r, count: length)
            states[r].result.stats.promptTokens = length
        }
        var hidden = Matrix.concatenateRows(parts)
        let batch = TokenBatch(positions: positions, sequences: sequences)
        var observation = ForwardObservation()
        language.forward(&hidden, batch: batch, layers: 0..<c.hiddenLayers, cache: &cache, observation: &observation)
        let lastRows = batch.spans.map { $0.tokens.upperBound - 1 }
        let logits = language.logits(hidden.gatherRows(lastRows))
        let prefillMilliseconds = milliseconds(since: prefillStart)
        for r in states.indices {
            states[r].result.stats.prefillMilliseconds = prefillMilliseconds
            states[r].result.stats.prefillFlops = prefillFlops(promptTokens: states[r].result.stats.promptTokens,
                                                               hasImage: requests[r].pixelValues != nil)
            accept(logits.row(r), into: &states[r], request: requests[r], cache: cache)
        }

        // Decode: one token per unfinished row per step.
        while true {
            let active = states.indices.filter { !states[$0].finished }
            if active.isEmpty { break }
            let stepStart = DispatchTime.now()
            var stepHidden = language.embed(active.map { states[$0].result.tokenIDs.last! })
            let stepBatch = TokenBatch(positions: active.map { states[$0].nextPosition }, sequences: active.map { states[$0].sequence })
            var stepObservation = ForwardObservation()
            language.forward(&stepHidden, batch: stepBatch, layers: 0..<c.hiddenLayers, cache: &cache, observation: &stepObservation)
            let stepLogits = language.logits(stepHidden)
            let stepMilliseconds = milliseconds(since: stepStart)
            for (row, r) in active.enumerated() {
                states[r].result.stats.decodeMilliseconds += stepMilliseconds
                states[r].result.stats.decodeFlops += decodeStepFlops(cache: cache, sequence: states[r].sequence)
                states[r].nextPosition += 1
                accept(stepLogits.row(row), into: &states[r], request: requests[r], cache: cache)
            }
        }
        return states.map { state in
            var result = state.result
            result.stats.kvCellsPerLayer = cache.cellCounts(sequence: state.sequence)
            return result
        }
    }

    /// Takes one step's logits for a row: logprobs, sampling, stop rules, accounting.
    func accept(_ logits: [Float], into state: inout RequestState, request: GenerationRequest, cache: KeyValueCache) {
        let parameters = request.parameters
        if recordsLogits { state.result.stepLogits.append(logits) }
        if parameters.logprobs > 0 { state.result.logprobs.append(topLogprobs(logits, k: parameters.logprobs)) }
        let token = state.sampler.sample(logits)
        state.result.tokenIDs.append(token)
        let cells = cache.cellCounts(sequence: state.sequence).reduce(0, +)
        state.result.stats.kvBytesPeak = max(state.result.stats.kvBytesPeak, cells * cache.keyValueWidth * 2 * 4)

        let generated = token == parameters.endOfSequence ? Array(state.result.tokenIDs.dropLast()) : state.result.tokenIDs
        if let detokenize {
            state.result.text = detokenize(generated)
            if let cut = parameters.stop.compactMap({ state.result.text.range(of: $0)?.lowerBound }).min() {
                state.result.text = String(state.result.text[..<cut])
                state.result.finishReason = .stop
                state.finished = true
                return
            }
        }
        if token == parameters.endOfSequence {
            state.result.finishReason = .stop
            state.finished = true
        } else if state.result.tokenIDs.count >= parameters.maxTokens || Int(state.nextPosition) >= model.language.configuration.maxPositionEmbeddings {
            state.result.finishReason = .length
            state.finished = true
        }
    }

    /// Multiply-adds x2 of the prompt pass: vision tower and projector (if an image), every
    /// decoder layer's projections and attention over the causal prompt, and the LM head row.
    func prefillFlops(promptTokens n: Int, hasImage: Bool) -> Int {
        let c = model.language.configuration
        let h = c.hiddenSize, q = c.attentionHeads * c.headDimension
        let projections = 2 * n * h * (q + 2 * c.keyValueWidth) + 2 * n * q * h + 3 * 2 * n * h * c.intermediateSize
        let attention = 2 * 2 * c.attentionHeads * c.headDimension * (n * (n + 1) / 2)
        var total = c.hiddenLayers * (projections + attention) + 2 * h * c.vocabularySize
        if hasImage {
            let v = model.vision.configuration
            let tokens = v.patchCount + 1, d = v.hiddenSize
            let perLayer = 2 * tokens * d * d * 4 + 2 * 2 * tokens * tokens * d + 2 * 2 * tokens * d * v.intermediateSize
            total += 2 * v.patchCount * d * v.channels * v.patchSize * v.patchSize + model.vision.layerCount * perLayer
            total += 2 * v.patchCount * (d * h + h * h)
        }
        return total
    }

    /// Multiply-adds x2 of one decode step for one row, given the cells it attended to.
    func decodeStepFlops(cache: KeyValueCache, sequence: Int) -> Int {
        let c = model.language.configuration
        let h = c.hiddenSize, q = c.attentionHeads * c.headDimension
        let projections = 2 * h * (q + 2 * c.keyValueWidth) + 2 * q * h + 3 * 2 * h * c.intermediateSize
        let cells = cache.cellCounts(sequence: sequence)
        let attention = cells.reduce(0) { $0 + 2 * 2 * c.attentionHeads * c.headDimension * $1 }
        return c.hiddenLayers * projections + attention + 2 * h * c.vocabularySize
    }
}

func milliseconds(since start: DispatchTime) -> Double {
    Double(DispatchTime.now().uptimeNanoseconds - start.uptimeNanoseconds) / 1e6
}
