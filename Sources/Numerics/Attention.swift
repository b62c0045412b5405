import CKernels

/// Scaled dot-product attention for ONE sequence, all heads, on the native kernels. Several
/// queries (a prompt): at f32, the packed-panel products (`dl_gemm_panels`, the same bits on every
/// CPU path), keys and values packed per head; at bf16 on the `amx` path, the AMX products
/// (`dl_gemm_amx`) on queries, keys, probabilities and values rounded to bf16, as PyTorch's bf16
/// attention multiplies them (scores, mask and softmax stay f32). One query (a decode step):
/// kernels that read each key and value once in place (`dl_gemm` for the scores,
/// `dl_weighted_sum` for the values), in f32 at either precision.
///
/// - `queries`: `[queryCount, heads * headDimension]` with row stride `queryStride`.
/// - `keys`, `values`: `[keyCount, keyValueHeads * headDimension]` with row strides
///   `keyStride`, `valueStride` (in elements), stored as `keyValueType` (`.float32` or `.bfloat16`,
///   widened exactly). Query head `h` reads key/value head `h / (heads / keyValueHeads)`.
/// - `mask`: `[queryCount, keyCount]` additive (`0` visible, `-infinity` hidden), or nil for none.
/// - `output`: `[queryCount, heads * headDimension]` with row stride `outputStride`.
/// - `probabilities`: when given, receives the softmax weights `[heads, queryCount, keyCount]`.
public func multiHeadAttention(
    queries: UnsafePointer<Float>, queryStride: Int, queryCount: Int,
    keys: UnsafeRawPointer, keyStride: Int,
    values: UnsafeRawPointer, valueStride: Int, keyCount: Int, keyValueType: StorageType = .float32,
    heads: Int, keyValueHeads: Int, headDimension: Int, scale: Float,
    mask: [Float]?,
    output: UnsafeMutablePointer<Float>, outputStride: Int,
    probabilities: UnsafeMutablePointer<Float>? = nil,
    path kernelPath: KernelPath = Kernels.path, precision: Precision = Kernels.precision
) {
    guard queryCount > 0 else { return }
    precondition(heads % keyValueHeads == 0, "attention: \(heads) heads do not group into \(keyValueHeads) key/value heads")
    precondition(mask == nil || mask!.count == queryCount * keyCount, "attention: mask is not [\(queryCount), \(keyCount)]")
    precondition(keyValueType == .float32 || keyValueType == .bfloat16, "attention: K/V are f32 or bf16, not \(keyValueType)")
    let group = heads / keyValueHeads
    if queryCount == 1 {
        singleQueryAttention(query: queries, keys: keys, keyStride: keyStride, values: values, valueStride: valueStride,
                             keyCount: keyCount, keyValueType: keyValueType, heads: heads, group: group, headDimension: headDimension,
                             scale: scale, mask: mask, output: output, probabilities: probabilities, path: kernelPath)
        return
    }
    let usesAMX = precision == .bf16 && kernelPath == .amx
    let path = kernelPath.cValue, panelWidth = 16, type = keyValueType.kernelType, size = keyValueType.byteCount
    let queryWidth = heads * headDimension
    // At bf16 on AMX every query row is rounded once, for all heads.
    var roundedQueries = [UInt16](repeating: 0, count: usesAMX ? queryCount * queryWidth : 0)
    if usesAMX {
        roundedQueries.withUnsafeMutableBufferPointer { rounded in
            for q in 0..<queryCount { dl_narrow_bf16(queries + q * queryStride, rounded.baseAddress! + q * queryWidth, queryWidth) }
        }
    }
    roundedQueries.withUnsafeBufferPointer { rounded in
        let pointers = UncheckedSendable((queries, keys, values, output, probabilities, usesAMX ? rounded.baseAddress : nil))
        // Heads are independent: spread over the workers (each writes its own output columns). The
        // keys are packed as the weight of the scores, the values (read by columns) as the weight
        // of the output.
        Parallelism.forEach(heads) { h in
            let (queries, keys, values, output, probabilities, roundedQueries) = pointers.value
            let scores = UnsafeMutablePointer<Float>.allocate(capacity: max(queryCount * keyCount, 1))
            let paddedKeys = (keyCount + panelWidth - 1) / panelWidth * panelWidth
            let paddedWidth = (headDimension + panelWidth - 1) / panelWidth * panelWidth
            let keyBytes = usesAMX ? dl_panel_bytes_bf16(keyCount, headDimension) : paddedKeys * headDimension * size
            let valueBytes = usesAMX ? dl_panel_bytes_bf16(headDimension, keyCount) : paddedWidth * keyCount * size
            let keyPanels = UnsafeMutableRawPointer.allocate(byteCount: max(keyBytes, 1), alignment: 64)
            let valuePanels = UnsafeMutableRawPointer.allocate(byteCount: max(valueBytes, 1), alignment: 64)
            defer {
                scores.deallocate()
                keyPanels.deallocate()
                valuePanels.deallocate()
            }
            let kv = (h / group) * headDimension
            if let roundedQueries {
                dl_pack_panels_bf16(type, keys + kv * size, keyStride, keyCount, headDimension, keyPanels, 0, paddedKeys / panelWidth)
                dl_gemm_amx(roundedQueries + h * headDimension, queryWidth, queryCount, keyPanels, headDimension, 0, keyCount, scores, keyCount)
            } else {
                dl_pack_panels(type, keys + kv * size, keyStride, keyCount, headDimension, keyPanels, 0, paddedKeys / panelWidth)
                dl_gemm_panels(path, type, queries + h * headDimension, queryStride, queryCount, keyPanels, headDimension,
                               0, keyCount, scores, keyCount)
            }
            for i in 0..<queryCount * keyCount { scores[i] *= scale }
            if let mask {
                mask.withUnsafeBufferPointer { m in
                    for i in 0..<queryCount * keyCount { scores[i] += m[i] }
                }
            }
            for q in 0..<queryCount { softmaxInPlace(scores + q * keyCount, count: keyCount, path: kernelPath) }
            if let probabilities {
                (probabilities + h * queryCount * keyCount).update(from: scores, count: queryCount * keyCount)
            }
            if usesAMX {
                let roundedScores = UnsafeMutablePointer<UInt16>.allocate(capacity: max(queryCount * keyCount, 1))
                defer { roundedScores.deallocate() }
                dl_narrow_bf16(scores, roundedScores, queryCount * keyCount)
                dl_pack_panels_bf16_from_columns(type, values + kv * size, valueStride, headDimension, keyCount, valuePanels)
                dl_gemm_amx(roundedScores, keyCount, queryCount, valuePanels, keyCount, 0, headDimension, output + h * headDimension,
                            outputStride)
            } else {
                dl_pack_panels_from_columns(type, values + kv * size, valueStride, headDimension, keyCount, valuePanels)
                dl_gemm_panels(path, type, scores, keyCount, queryCount, valuePanels, keyCount,
                               0, headDimension, output + h * headDimension, outputStride)
            }
        }
    }
}

/// `multiHeadAttention` for one query (`[heads * headDimension]`), on the native kernels.
func singleQueryAttention(
    query: UnsafePointer<Float>, keys: UnsafeRawPointer, keyStride: Int, values: UnsafeRawPointer, valueStride: Int,
    keyCount: Int, keyValueType: StorageType, heads: Int, group: Int, headDimension: Int, scale: Float, mask: [Float]?,
    output: UnsafeMutablePointer<Float>, probabilities: UnsafeMutablePointer<Float>?, path kernelPath: KernelPath = Kernels.path
) {
    let path = kernelPath.cValue, type = keyValueType.kernelType, size = keyValueType.byteCount
    let pointers = UncheckedSendable((query, keys, values, output, probabilities))
    Parallelism.forEach(heads) { h in
        let (query, keys, values, output, probabilities) = pointers.value
        let scores = UnsafeMutablePointer<Float>.allocate(capacity: max(keyCount, 1))
        defer { scores.deallocate() }
        let kv = (h / group) * headDimension
        dl_gemm(path, type, query + h * headDimension, headDimension, 1, keys + kv * size, headDimension, keyStride,
                0, keyCount, scores, keyCount, 6)
        for j in 0..<keyCount { scores[j] *= scale }
        if let mask {
            mask.withUnsafeBufferPointer { m in
                for j in 0..<keyCount { scores[j] += m[j] }
            }
        }
        softmaxInPlace(scores, count: keyCount, path: kernelPath)
        probabilities?.advanced(by: h * keyCount).update(from: scores, count: keyCount)
        dl_weighted_sum(path, scores, keyCount, type, values + kv * size, valueStride, headDimension, output + h * headDimension)
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
