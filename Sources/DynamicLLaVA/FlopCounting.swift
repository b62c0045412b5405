// Multiply-adds counted from the shapes actually run (docs/DYNAMIC_LLAVA.md "FLOPs").
import Foundation
import Sparsification

extension Generator {
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
