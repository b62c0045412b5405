// The image-prefix cache: in LLaVA-1.5's prompt the system text and the image come before the
// question, and every layer is causal, so the prefix's K/V never depend on the question. In
// Dynamic-LLaVA's mode the image predictor reads only the image tokens' hidden states at the
// sparse layer (themselves causal: they see only the prefix), so the kept set does not depend on
// the question either; question tokens are never dropped at prefill (use_instruct_predictor is
// false), and the output-text gate only sees generated tokens. So every question asked about one
// image, in full context or dynamic mode, shares the prefix's cells: full below the sparse layer,
// the kept image tokens above it. FastV is not cached (its kept set reads the attention of the
// LAST prompt token, a question token), nor is random dropping (its kept set follows each job's
// seed), nor decoding without a KV cache (nothing is cached to reuse).
//
// Reuse is exact: a question's tokens see the same cells, in the same order and with the same
// masks, as in one pass over the whole prompt (at least two question tokens, so their attention
// takes the same several-query path), and the products are row-invariant; the prefix's own rows
// see fewer masked keys, which adds only exact zeros (softmax terms e^-inf and products with them).
import Llama
import Numerics

/// The prefix cells of recent images, bounded in bytes, least recently used evicted first.
struct PrefixCache {
    /// What decides a prefix's cells: the tokens before the image, the image's pixels (bit for bit), the mode and
    /// the number of image tokens it keeps, and the precision of the products. One cache serves one model.
    struct Key: Hashable {
        let idsBeforeImage: [Int32]
        let pixelBits: [UInt32]
        let mode: SparsityMode
        let keptImageCount: Int
        let precision: Precision
    }

    /// One prefix through every layer.
    struct Entry {
        /// `[layers]` the prefix's cells in each layer (prompt positions `0..<tokens`; above the sparse layer only
        /// the kept image tokens among them).
        var cells: [SequenceCells]
        /// Tokens of the prefix (text before the image and every image token).
        var tokens: Int
        /// The kept image tokens (indices into the image's tokens, ascending) when the mode pruned, else nil.
        var keptImageIndices: [Int]?
        /// Bytes held: the cells and the key's pixels.
        var byteCount: Int
        var lastUse = 0
    }

    /// Bytes the entries may hold together; 0 turns the cache off.
    let capacityBytes: Int
    private(set) var entries: [Key: Entry] = [:]
    private(set) var byteCount = 0
    private var uses = 0

    init(capacityBytes: Int) {
        precondition(capacityBytes >= 0, "a prefix cache holds a non-negative number of bytes")
        self.capacityBytes = capacityBytes
    }

    var isEnabled: Bool { capacityBytes > 0 }

    /// The entry of `key`, marked as just used; nil when it is not held.
    mutating func entry(_ key: Key) -> Entry? {
        guard var entry = entries[key] else { return nil }
        uses += 1
        entry.lastUse = uses
        entries[key] = entry
        return entry
    }

    /// Holds `entry` under `key`, evicting the least recently used entries until it fits; an entry larger than the
    /// whole capacity is not held.
    mutating func insert(_ entry: Entry, for key: Key) {
        guard entry.byteCount <= capacityBytes else { return }
        if let old = entries.removeValue(forKey: key) { byteCount -= old.byteCount }
        while byteCount + entry.byteCount > capacityBytes, let oldest = entries.min(by: { $0.value.lastUse < $1.value.lastUse }) {
            entries[oldest.key] = nil
            byteCount -= oldest.value.byteCount
        }
        uses += 1
        var entry = entry
        entry.lastUse = uses
        entries[key] = entry
        byteCount += entry.byteCount
    }
}

extension Generator {
    /// The key under which `request` shares its image prefix, or nil when its prefix is not cached: no image, a
    /// mode whose kept set depends on more than the prefix (FastV, random), no KV cache, or fewer than two tokens
    /// after the image (a single query takes the one-query attention path, not the prompt's).
    func prefixKey(_ request: GenerationRequest) -> PrefixCache.Key? {
        let sparsity = request.parameters.sparsity
        guard let pixels = request.pixelValues, sparsity.usesKeyValueCache, sparsity.mode == .full || sparsity.mode == .dynamic,
              request.idsAfterImage.count >= 2 else { return nil }
        return PrefixCache.Key(idsBeforeImage: request.idsBeforeImage, pixelBits: pixels.map(\.bitPattern), mode: sparsity.mode,
                               keptImageCount: keptImageCount(sparsity), precision: Kernels.precision)
    }
}
