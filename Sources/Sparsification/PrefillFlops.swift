// The paper's architecture-level prefill FLOPs (DYNAMIC_LLAVA.md section 8, Eq. 13).

/// Prefill FLOPs as the paper counts them: per decoder layer `32 N C² + 4 N² C` for `N` image
/// tokens and hidden size `C` (batch 1, text tokens not counted).
public enum PaperFlops {
    public static func layer(imageTokens n: Int, hiddenSize c: Int) -> Double {
        let n = Double(n), c = Double(c)
        return 32 * n * c * c + 4 * n * n * c
    }

    /// All layers at `N` image tokens.
    public static func full(layers: Int, imageTokens n: Int, hiddenSize c: Int) -> Double {
        Double(layers) * layer(imageTokens: n, hiddenSize: c)
    }

    /// `first` layers at the full `N`, the rest at the `kept` tokens (Dynamic-LLaVA: first = sparse
    /// layer, kept = Int(N x vision_keep_rate); FastV: first = K, kept = round(N x (1 - r))).
    public static func pruned(layers: Int, first: Int, imageTokens n: Int, kept: Int, hiddenSize c: Int) -> Double {
        Double(first) * layer(imageTokens: n, hiddenSize: c) + Double(layers - first) * layer(imageTokens: kept, hiddenSize: c)
    }
}
