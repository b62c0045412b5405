// Prefill: new rows' prompts embedded (the vision tower over all their images in one pass) and
// run through the decoder together, each row's image tokens pruned at its mode's layer
// (docs/DYNAMIC_LLAVA.md sections 2 and 4). Rows never see each other: the products are
// row-invariant and attention stays within a sequence, so a row's cells and logits are those it
// gets alone.
import Foundation
import Llama
import Numerics
import Sparsification

extension Generator {
    /// Per request, the prompt embeddings `[n, H]` (text | image | text) and where the image sits:
    /// the vision tower and projector run once over every request's image, stacked.
    func promptEmbeddings(_ requests: [GenerationRequest]) -> [(embeddings: Matrix, imageSpan: Range<Int>?)] {
        let language = model.language, patches = model.vision.configuration.patchCount
        let images = model.imageEmbeddings(requests.compactMap(\.pixelValues))
        var nextImage = 0
        return requests.map { request in
            var parts = [language.embed(request.idsBeforeImage)]
            var imageSpan: Range<Int>?
            if request.pixelValues != nil {
                parts.append(images[nextImage])
                nextImage += 1
                imageSpan = request.idsBeforeImage.count ..< request.idsBeforeImage.count + patches
            }
            parts.append(language.embed(request.idsAfterImage))
            return (Matrix.concatenateRows(parts), imageSpan)
        }
    }

    /// Runs the prompts of `states` (rows with a KV cache, fresh sequences) through every layer
    /// in one packed pass, pruning each row's image tokens at its mode's layer, and leaves their
    /// cells in `cache`. A row with a `cachedPrefixLength` already holds its image prefix's cells
    /// (from the prefix cache) and runs only the tokens after it, none pruned. Returns each row's
    /// logits for its last prompt token, and adds each row's multiply-adds to `flops`.
    func prefill(_ states: inout [RequestState], cache: inout KeyValueCache, flops: inout [Int]) -> [[Float]] {
        let language = model.language, layerCount = language.layerCount
        var hidden = Matrix.concatenateRows(states.map { state in
            guard let embeddings = state.promptEmbeddings else { preconditionFailure("a prefilled request has its embeddings") }
            precondition(embeddings.rows == state.promptLength - state.cachedPrefixLength, "embeddings of the tokens after the cached prefix")
            return embeddings
        })
        var batch = TokenBatch(positions: states.flatMap { (Int32($0.cachedPrefixLength)..<Int32($0.promptLength)).map { $0 } },
                               sequences: states.flatMap { Array(repeating: $0.sequence, count: $0.promptLength - $0.cachedPrefixLength) })
        let pruning = states.map { $0.cachedPrefixLength > 0 ? (layer: layerCount, observedAttention: []) : pruningLayer($0.sparsity) }
        var observation = ForwardObservation(attentionLayers: pruning.reduce(into: Set<Int>()) { $0.formUnion($1.observedAttention) })
        for r in states.indices where states[r].cachedPrefixLength == 0 { states[r].result.stats.imageTokensKept = states[r].imageSpan?.count ?? 0 }
        // Run up to each layer where some rows prune, prune them there, and go on.
        var layer = 0
        for split in Set(pruning.map(\.layer)).sorted() where split < layerCount {
            language.forward(&hidden, batch: batch, layers: layer..<split, cache: &cache, observation: &observation)
            layer = split
            var selection: [Int] = []
            for (r, span) in batch.spans.enumerated() {
                guard pruning[r].layer == split else {
                    selection += Array(span.tokens)
                    continue
                }
                let kept = selectedTokens(&states[r], sequence: span.sequence, hiddenAtSplit: hidden.rows(span.tokens),
                                          observation: observation, flops: &flops[r])
                selection += kept.map { span.tokens.lowerBound + $0 }
            }
            hidden = hidden.gatherRows(selection)
            batch = batch.selecting(selection)
        }
        language.forward(&hidden, batch: batch, layers: layer..<layerCount, cache: &cache, observation: &observation)
        for r in states.indices { flops[r] += observation.flops[states[r].sequence] ?? 0 }
        let logits = language.logits(hidden.gatherRows(batch.spans.map { $0.tokens.upperBound - 1 }))
        return states.indices.map { logits.row($0) }
    }

    /// The prompt tokens (indices into the row's unpruned prompt) that go on past the row's
    /// pruning layer: every token but the image tokens its mode drops. Records the kept image
    /// tokens in the row's result. `hiddenAtSplit`: the hidden states `[T, H]` of the row's
    /// sequence entering the pruning layer, prompt first (T counts any generated tokens too);
    /// `sequence`: the cache sequence they run in (FastV reads its attention).
    func selectedTokens(_ state: inout RequestState, sequence: Int, hiddenAtSplit: Matrix, observation: ForwardObservation,
                        flops: inout Int) -> [Int] {
        let tokens = state.promptLength
        guard let imageSpan = state.imageSpan else { return Array(0..<tokens) }
        let kept = keptImageTokens(state, sequence: sequence, imageSpan: imageSpan, count: keptImageCount(state.sparsity), hiddenAtSplit: hiddenAtSplit,
                                   observation: observation, flops: &flops)
        state.result.stats.imageTokensKept = kept.count
        state.result.keptImageIndices = kept
        state.result.stats.keptImageIndices = kept
        return Array(0..<imageSpan.lowerBound) + kept.map { imageSpan.lowerBound + $0 } + Array(imageSpan.upperBound..<tokens)
    }

    /// The image tokens (indices into the image span, ascending) a request keeps. FastV reads the
    /// attention of cache sequence `sequence`; its last prompt token is `state.promptLength - 1`.
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
}
