import CBLAS

/// Thread control for OpenBLAS, which does all matrix products.
public enum BLAS {
    /// Number of threads OpenBLAS uses for a product.
    public static var threadCount: Int {
        get { Int(openblas_get_num_threads()) }
        set { openblas_set_num_threads(Int32(newValue)) }
    }

    /// `C[M, N] = alpha * A[M, K] · op(B) + beta * C`, row-major, where `op(B)` is `B` `[K, N]`
    /// or, with `transposeB`, `Bᵀ` for `B` `[N, K]`. Leading dimensions are element strides.
    @inline(__always)
    public static func sgemm(
        m: Int, n: Int, k: Int,
        a: UnsafePointer<Float>, lda: Int,
        b: UnsafePointer<Float>, ldb: Int, transposeB: Bool,
        c: UnsafeMutablePointer<Float>, ldc: Int,
        alpha: Float = 1, beta: Float = 0
    ) {
        guard m > 0, n > 0 else { return }
        cblas_sgemm(
            CblasRowMajor, CblasNoTrans, transposeB ? CblasTrans : CblasNoTrans,
            blasint(m), blasint(n), blasint(k), alpha, a, blasint(lda), b, blasint(ldb), beta, c, blasint(ldc))
    }
}

/// How many rows of a narrow (f16/bf16) weight are widened to f32 at a time.
///
/// Decode-sized products (few activation rows) use small bands that stay in cache, so a token
/// streams the narrow weights once; prefill-sized products use large bands so the activation
/// matrix is packed by OpenBLAS only a few times. The band never changes which products are summed
/// for an output element, only how many columns one sgemm call produces.
@inline(__always)
func widenBandRows(activationRows: Int, weight: WeightMatrix) -> Int {
    let targetBytes = activationRows <= 16 ? 256 << 10 : 32 << 20
    return max(1, min(weight.rows, targetBytes / max(weight.columns * 4, 1)))
}

/// `y = x · Wᵀ + bias`: `x` `[M, K]`, `weight` `[N, K]` (PyTorch Linear layout), `bias` `[N]`;
/// result `[M, N]`. Every product goes through OpenBLAS sgemm; narrow weights are widened one
/// band of rows at a time, never as a whole.
public func linear(_ x: Matrix, _ weight: WeightMatrix, bias: [Float]? = nil) -> Matrix {
    precondition(x.columns == weight.columns, "linear: input has \(x.columns) features, weight expects \(weight.columns)")
    let m = x.rows, n = weight.rows, k = weight.columns
    var output = [Float](repeating: 0, count: m * n)
    if m > 0 && n > 0 {
        x.values.withUnsafeBufferPointer { xp in
            output.withUnsafeMutableBufferPointer { yp in
                if weight.storageType == .float32 {
                    BLAS.sgemm(m: m, n: n, k: k, a: xp.baseAddress!, lda: k,
                               b: weight.base.assumingMemoryBound(to: Float.self), ldb: k, transposeB: true,
                               c: yp.baseAddress!, ldc: n)
                } else {
                    let band = widenBandRows(activationRows: m, weight: weight)
                    let scratch = UnsafeMutablePointer<Float>.allocate(capacity: band * k)
                    defer { scratch.deallocate() }
                    var start = 0
                    while start < n {
                        let end = min(n, start + band)
                        weight.widenRows(start..<end, into: scratch)
                        BLAS.sgemm(m: m, n: end - start, k: k, a: xp.baseAddress!, lda: k,
                                   b: scratch, ldb: k, transposeB: true,
                                   c: yp.baseAddress! + start, ldc: n)
                        start = end
                    }
                }
            }
        }
    }
    if let bias {
        precondition(bias.count == n, "linear: bias has \(bias.count) values, expected \(n)")
        output.withUnsafeMutableBufferPointer { yp in
            bias.withUnsafeBufferPointer { bp in
                for r in 0..<m {
                    let row = yp.baseAddress! + r * n
                    for c in 0..<n { row[c] += bp[c] }
                }
            }
        }
    }
    return Matrix(rows: m, columns: n, values: output)
}
