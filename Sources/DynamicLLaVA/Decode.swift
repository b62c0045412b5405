// One decode step for the rows of a batch that have a KV cache: each feeds its newest token, and
// a weight is read once for all of them (docs/DYNAMIC_LLAVA.md section 3, the output-text gate).
import Foundation
import Llama
import Numerics
import Sparsification

extension Generator {
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
            return KeepRules.randomOutputToken(seed: state.parameters.sampling.seed, position: state.nextPosition, keepRate: outputKeepRate(state.sparsity))
        case .everyOther:
            return KeepRules.everyOtherOutputToken(generatedIndex: state.result.tokenIDs.count - 1)
        }
    }
}
