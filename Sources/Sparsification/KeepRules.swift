// Which tokens survive (DYNAMIC_LLAVA.md sections 4 and the baselines).
import Foundation
import Numerics

public enum KeepRules {
    /// Image tokens kept by the image predictor: the `k` highest `log_softmax(logits)[:, 0]`,
    /// returned in ascending (original) order. `logits`: `[N, 2]`.
    ///
    /// `log_softmax(l)[0] = -softplus(l1 - l0)` orders tokens exactly as `l0 - l1` does, but in
    /// f32 it saturates to 0 once `l0 - l1` exceeds ~17, making ties the reference then breaks
    /// arbitrarily; ranking by `l0 - l1` keeps the same order without the ties (lower index
    /// first on a true tie).
    public static func topImageTokens(logits: Matrix, k: Int) -> [Int] {
        precondition(logits.columns == 2, "image predictor logits are [N, 2]")
        let scores = (0..<logits.rows).map { t in logits.values[2 * t] - logits.values[2 * t + 1] }
        return topIndices(scores, k: k)
    }

    /// The output-text gate: keep iff logit0 > logit1 (strict: a tie drops).
    public static func keepsOutputToken(_ logits: [Float]) -> Bool {
        logits[0] > logits[1]
    }

    /// Random output-token baseline: keep with probability `keepRate`, a pure function of the
    /// seed and the token's position.
    public static func randomOutputToken(seed: UInt64, position: Int32, keepRate: Double) -> Bool {
        var generator = SplitMix64(seed: seed ^ (UInt64(UInt32(bitPattern: position)) &* 0x9E37_79B9_7F4A_7C15))
        return Double(generator.next() >> 11) / Double(1 << 53) < keepRate
    }

    /// Structured output-token baseline: generated tokens 0, 2, 4, ... kept, 1, 3, 5, ... dropped.
    public static func everyOtherOutputToken(generatedIndex: Int) -> Bool {
        generatedIndex % 2 == 0
    }

    /// FastV: the `k` image tokens with the highest attention weight from the last prompt token,
    /// averaged over heads, ascending. `weights`: `[heads, queries, keys]` of one sequence;
    /// `query` the last prompt token's row; `imageKeys` the image tokens' key indices.
    public static func fastVImageTokens(weights: [Float], heads: Int, queries: Int, keys: Int,
                                        query: Int, imageKeys: Range<Int>, k: Int) -> [Int] {
        let scores = imageKeys.map { key -> Double in
            (0..<heads).reduce(0.0) { $0 + Double(weights[($1 * queries + query) * keys + key]) } / Double(heads)
        }
        return topIndices(scores.map { Float($0) }, k: k)
    }

    /// `k` distinct image-token indices out of `n`, uniformly at random from `seed`, ascending.
    public static func randomImageTokens(count n: Int, k: Int, seed: UInt64) -> [Int] {
        var generator = SplitMix64(seed: seed)
        var indices = Array(0..<n)
        for i in 0..<min(k, n) {
            let j = i + Int(generator.next() % UInt64(n - i))
            indices.swapAt(i, j)
        }
        return indices.prefix(k).sorted()
    }

    /// Indices of the `k` largest values (ties: the lower index first), in ascending order.
    public static func topIndices(_ values: [Float], k: Int) -> [Int] {
        let order = values.indices.sorted { values[$0] > values[$1] || (values[$0] == values[$1] && $0 < $1) }
        return order.prefix(max(0, k)).sorted()
    }
}
