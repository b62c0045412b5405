import CBLAS
import Dispatch

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

    /// `y[N] = A[N, K] · x[K]`, row-major `A` with leading dimension `lda`.
    @inline(__always)
    public static func sgemv(n: Int, k: Int, a: UnsafePointer<Float>, lda: Int, x: UnsafePointer<Float>, y: UnsafeMutablePointer<Float>) {
        guard n > 0 else { return }
        cblas_sgemv(CblasRowMajor, CblasNoTrans, blasint(n), blasint(k), 1, a, blasint(lda), x, 1, 0, y, 1)
    }
}

/// `y = x · Wᵀ + bias` for prompt-sized inputs: `x` `[M, K]`, `weight` `[N, K]` (PyTorch Linear
/// layout), `bias` `[N]`; result `[M, N]`. One OpenBLAS sgemm over all M rows (multi-threaded);
/// narrow weights are widened one band of rows at a time, never as a whole.
///
/// OpenBLAS rounds a row differently depending on where it falls in its micro-kernel tiles, so a
/// row's result depends on the other rows of the call. Callers that need a row to be computed
/// exactly as it would be alone (batched decoding) use `linearPerRow`.
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
                    // Large bands: OpenBLAS packs `x` once per band.
                    let band = max(1, min(n, (32 << 20) / max(k * 4, 1)))
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
    if let bias { addBias(&output, bias, rows: m) }
    return Matrix(rows: m, columns: n, values: output)
}

/// Threads used by every product: OpenBLAS's own for `linear`, workers for `linearPerRow`.
/// Set once at start-up (results depend on it: OpenBLAS splits a product differently).
public enum Parallelism {
    nonisolated(unsafe) public private(set) static var threads = 1

    public static func setThreads(_ count: Int) {
        threads = max(1, count)
        BLAS.threadCount = threads
    }
}

/// Rows of a weight band for `linearPerRow`: a widened band (f32) of about 4 MiB, which stays
/// in the last-level cache while every row of the batch reads it. Depends only on the weight's
/// shape, never on the activations, so a row's result never depends on the batch.
@inline(__always)
func perRowBandRows(_ weight: WeightMatrix) -> Int {
    max(16, min(weight.rows, (4 << 20) / max(weight.columns * 4, 1)) / 16 * 16)
}

/// `y = x · Wᵀ + bias` where every row of `x` is multiplied alone, so row `r`'s result is
/// bit-identical whatever other rows `x` holds: the decode path, where a batch of N must equal
/// N batches of 1.
///
/// Why not one sgemm: OpenBLAS's sgemm rounds a row differently depending on its place in the
/// micro-kernel tiles, hence on M (measured: padding M to a multiple of 16 does not help either).
/// Each row is therefore an OpenBLAS sgemv (a dot product per output, its order fixed by the
/// weight band alone), which also costs a third of an M = 1 sgemm call. Weight bands are widened
/// once and reused by every row while they sit in cache, so the weights stream from memory once
/// per call whatever the batch size. Bands are spread over `Parallelism.threads` workers, each
/// calling single-threaded OpenBLAS.
public func linearPerRow(_ x: Matrix, _ weight: WeightMatrix, bias: [Float]? = nil) -> Matrix {
    precondition(x.columns == weight.columns, "linearPerRow: input has \(x.columns) features, weight expects \(weight.columns)")
    let m = x.rows, n = weight.rows, k = weight.columns
    var output = [Float](repeating: 0, count: m * n)
    let band = perRowBandRows(weight)
    let bandCount = (n + band - 1) / band
    if m > 0 && n > 0 {
        x.values.withUnsafeBufferPointer { xp in
            output.withUnsafeMutableBufferPointer { yp in
                let pointers = UncheckedSendable((xp.baseAddress!, yp.baseAddress!))
                let workers = max(1, min(Parallelism.threads, bandCount))
                // Workers write disjoint column bands of `output`.
                let work: @Sendable (Int) -> Void = { worker in
                    let (xBase, yBase) = pointers.value
                    let scratch = weight.storageType == .float32 ? nil : UnsafeMutablePointer<Float>.allocate(capacity: band * k)
                    defer { scratch?.deallocate() }
                    var b = worker
                    while b < bandCount {
                        let start = b * band, end = min(n, start + band)
                        let bandWeights: UnsafePointer<Float>
                        if let scratch {
                            weight.widenRows(start..<end, into: scratch)
                            bandWeights = UnsafePointer(scratch)
                        } else {
                            bandWeights = weight.base.assumingMemoryBound(to: Float.self) + start * k
                        }
                        for r in 0..<m {
                            BLAS.sgemv(n: end - start, k: k, a: bandWeights, lda: k, x: xBase + r * k, y: yBase + r * n + start)
                        }
                        b += workers
                    }
                }
                // OpenBLAS would split a large sgemv over its own threads; the workers are the threads here.
                let saved = BLAS.threadCount
                BLAS.threadCount = 1
                if workers == 1 { work(0) } else { DispatchQueue.concurrentPerform(iterations: workers, execute: work) }
                BLAS.threadCount = saved
            }
        }
    }
    if let bias { addBias(&output, bias, rows: m) }
    return Matrix(rows: m, columns: n, values: output)
}

/// Lets raw pointers cross into `concurrentPerform` workers that touch disjoint memory.
struct UncheckedSendable<Value>: @unchecked Sendable {
    let value: Value
    init(_ value: Value) { self.value = value }
}

func addBias(_ output: inout [Float], _ bias: [Float], rows m: Int) {
    let n = bias.count
    precondition(output.count == m * n, "linear: bias has \(n) values, output rows have \(output.count / max(m, 1))")
    output.withUnsafeMutableBufferPointer { yp in
        bias.withUnsafeBufferPointer { bp in
            for r in 0..<m {
                let row = yp.baseAddress! + r * n
                for c in 0..<n { row[c] += bp[c] }
            }
        }
    }
}
