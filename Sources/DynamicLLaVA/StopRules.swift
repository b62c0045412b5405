// Stop rules: what a row does with one step's logits (logprobs, sampling or a replayed prefix
// token), and when it ends (end of sequence, a stop string, max tokens, the context).
import Foundation
import Llama
import Numerics

extension Generator {
    /// Takes one step's logits for a row: logprobs, sampling, stop rules, accounting.
    func accept(_ logits: [Float], into state: inout RequestState, cellsNow: [Int]) {
        let parameters = state.parameters
        let bytes = cellsNow.reduce(0, +) * model.language.configuration.keyValueWidth * 2 * KeyValueCache.storage(for: Kernels.precision).byteCount
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

    /// The most cells a row's sequence can still gain in a layer: one per token it will still
    /// feed, bounded by `maxTokens` and by the context.
    func cellsToCome(_ state: RequestState) -> Int {
        let generated = state.result.tokenIDs.count
        let context = model.language.configuration.maxPositionEmbeddings
        return max(0, min(state.parameters.maxTokens - generated, context - state.promptLength - generated) + 1)
    }
}
