/// Scaled dot-product attention for ONE sequence, all heads, products through sgemm.
///
/// - `queries`: `[queryCount, heads * headDimension]` with row stride `queryStride`.
/// - `keys`, `values`: `[keyCount, keyValueHeads * headDimension]` with row strides
///   `keyStride`, `valueStride`. Query head `h` reads key/value head `h / (heads / keyValueHeads)`.
/// - `mask`: `[queryCount, keyCount]` additive (`0` visible, `-infinity` hidden), or nil for none.
/// - `output`: `[queryCount, heads * headDimension]` with row stride `outputStride`.
/// - `probabilities`: when given, receives the softmax weights `[heads, queryCount, keyCount]`.
public func multiHeadAttention(
    queries: UnsafePointer<Float>, queryStride: Int, queryCount: Int,
    keys: UnsafePointer<Float>, keyStride: Int,
    values: UnsafePointer<Float>, valueStride: Int, keyCount: Int,
    heads: Int, keyValueHeads: Int, headDimension: Int, scale: Float,
    mask: [Float]?,
    output: UnsafeMutablePointer<Float>, outputStride: Int,
    probabilities: UnsafeMutablePointer<Float>? = nil
) {
    guard queryCount > 0 else { return }
    precondition(heads % keyValueHeads == 0, "attention: \(heads) heads do not group into \(keyValueHeads) key/value heads")
    precondition(mask == nil || mask!.count == queryCount * keyCount, "attention: mask is not [\(queryCount), \(keyCount)]")
    let group = heads / keyValueHeads
    let pointers = UncheckedSendable((queries, keys, values, output, probabilities))
    // Heads are independent: spread over the workers (each writes its own output columns).
    Parallelism.forEach(heads) { h in
        let (queries, keys, values, output, probabilities) = pointers.value
        let scores = UnsafeMutablePointer<Float>.allocate(capacity: max(queryCount * keyCount, 1))
        defer { scores.deallocate() }
        let kv = (h / group) * headDimension
        BLAS.sgemm(m: queryCount, n: keyCount, k: headDimension,
                   a: queries + h * headDimension, lda: queryStride,
                   b: keys + kv, ldb: keyStride, transposeB: true,
                   c: scores, ldc: keyCount, alpha: scale)
        if let mask {
            mask.withUnsafeBufferPointer { m in
                for i in 0..<queryCount * keyCount { scores[i] += m[i] }
            }
        }
        for q in 0..<queryCount { softmaxInPlace(scores + q * keyCount, count: keyCount) }
        if let probabilities {
            (probabilities + h * queryCount * keyCount).update(from: scores, count: queryCount * keyCount)
        }
        BLAS.sgemm(m: queryCount, n: headDimension, k: keyCount,
                   a: scores, lda: keyCount,
                   b: values + kv, ldb: valueStride, transposeB: false,
                   c: output + h * headDimension, ldc: outputStride)
    }
}

extension ReferenceKernels {
    /// Attention with explicit loops in Double; `visible(q, k)` is the mask.
    public static func attention(
        queries: Matrix, keys: Matrix, values: Matrix, heads: Int, keyValueHeads: Int,
        headDimension: Int, scale: Float, visible: (Int, Int) -> Bool
    ) -> Matrix {
        var out = Matrix(zeros: queries.rows, heads * headDimension)
        let group = heads / keyValueHeads
        for h in 0..<heads {
            let kv = (h / group) * headDimension
            for q in 0..<queries.rows {
                var logits = [Float](repeating: -.infinity, count: keys.rows)
                for k in 0..<keys.rows where visible(q, k) {
                    var dot = 0.0
                    for d in 0..<headDimension {
                        dot += Double(queries.values[q * queries.columns + h * headDimension + d]) * Double(keys.values[k * keys.columns + kv + d])
                    }
                    logits[k] = Float(dot * Double(scale))
                }
                let p = softmax(logits)
                for d in 0..<headDimension {
                    var sum = 0.0
                    for k in 0..<keys.rows { sum += Double(p[k]) * Double(values.values[k * values.columns + kv + d]) }
                    out.values[q * out.columns + h * headDimension + d] = Float(sum)
                }
            }
        }
        return out
    }
}
