// Decoding without a KV cache (docs/DYNAMIC_LLAVA.md section 4): every step runs the whole
// sequence again through a fresh cache, pruning as prefill does.
import Foundation
import Llama
import Numerics
import Sparsification

extension Generator {
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
        var cache = KeyValueCache(layers: c.hiddenLayers, sequences: 1, keyValueWidth: c.keyValueWidth,
                                  storage: KeyValueCache.storage(for: Kernels.precision))
        let (split, observed) = pruningLayer(state.sparsity)
        var observation = ForwardObservation(attentionLayers: observed)
        // The newest token's hidden state is what predicts the next one.
        language.forward(&hidden, batch: batch, layers: 0..<split, cache: &cache, observation: &observation)
        state.result.stats.imageTokensKept = state.imageSpan?.count ?? 0
        if split < layerCount {
            var selection = selectedTokens(&state, sequence: 0, hiddenAtSplit: hidden, observation: observation, flops: &flops)
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
        flops += (observation.flops[0] ?? 0) + 2 * c.hiddenSize * c.vocabularySize
        state.result.stats.kvCellsPerLayer = cache.cellCounts(sequence: 0)
        return language.logits(hidden.rows((hidden.rows - 1)..<hidden.rows)).row(0)
    }
}
