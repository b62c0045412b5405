import CBLAS
import Dispatch

/// OpenBLAS, which does every matrix product, always single-threaded: the engine runs its own
/// workers over fixed bands of the output, so no result depends on how many threads run.
public enum BLAS {
    /// Set once, before the first product: OpenBLAS's own threading off (it would split a product
    /// differently for each thread count, and calls from several workers must not nest threads).
    static let singleThreaded: Void = openblas_set_num_threads(1)

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
        _ = singleThreaded
        cblas_sgemm(
            CblasRowMajor, CblasNoTrans, transposeB ? CblasTrans : CblasNoTrans,
            blasint(m), blasint(n), blasint(k), alpha, a, blasint(lda), b, blasint(ldb), beta, c, blasint(ldc))
    }

    /// `y[N] = A[N, K] · x[K]`, row-major `A` with leading dimension `lda`.
    @inline(__always)
    public static func sgemv(n: Int, k: Int, a: UnsafePointer<Float>, lda: Int, x: UnsafePointer<Float>, y: UnsafeMutablePointer<Float>) {
        guard n > 0 else { return }
        _ = singleThreaded
        cblas_sgemv(CblasRowMajor, CblasNoTrans, blasint(n), blasint(k), 1, a, blasint(lda), x, 1, 0, y, 1)
    }
}

/// Worker threads for the products. Results never depend on it: work is split into bands fixed
/// by the weight's shape, and each band is computed the same way whichever worker takes it.
public enum Parallelism {
    nonisolated(unsafe) public private(set) static var threads = 1

    /// Call once at start-up (the CLI's `--threads`).
    public static func setThreads(_ count: Int) {
        threads = max(1, count)
    }

    /// Runs `body(i)` for `i` in `0..<count`, spread over `threads` workers (round-robin).
    public static func forEach(_ count: Int, _ body: @Sendable (Int) -> Void) {
        let workers = max(1, min(threads, count))
        if workers == 1 {
            for i in 0..<count { body(i) }
            return
        }
        DispatchQueue.concurrentPerform(iterations: workers) { worker in
            var i = worker
            while i < count {
                body(i)
                i += workers
            }
        }
    }
}

/// Lets raw pointers cross into workers that touch disjoint memory.
struct UncheckedSendable<Value>: @unchecked Sendable {
    let value: Value
    init(_ value: Value) { self.value = value }
}

/// Rows of a weight band: about `bytes` once widened to f32, a multiple of 16, at least 16.
/// A function of the weight's shape alone, never of the activations or the thread count.
@inline(__always)
func bandRows(_ weight: WeightMatrix, bytes: Int) -> Int {
    max(16, min(weight.rows, bytes / max(weight.columns * 4, 1)) / 16 * 16)
}

/// Calls `body(band rows, f32 weights of the band)` for every band of `weight`, on the workers;
/// narrow weights are widened into a per-band scratch buffer, f32 weights are used in place.
func forEachBand(of weight: WeightMatrix, rows band: Int, _ body: @Sendable (Range<Int>, UnsafePointer<Float>) -> Void) {
    let n = weight.rows, k = weight.columns
    let bands = (n + band - 1) / band
    Parallelism.forEach(bands) { b in
        let range = b * band ..< min(n, (b + 1) * band)
        if weight.storageType == .float32 {
            body(range, weight.base.assumingMemoryBound(to: Float.self) + range.lowerBound * k)
        } else {
            let scratch = UnsafeMutablePointer<Float>.allocate(capacity: range.count * k)
            defer { scratch.deallocate() }
            weight.widenRows(range, into: scratch)
            body(range, UnsafePointer(scratch))
        }
    }
}

/// `y = x · Wᵀ + bias` for prompt-sized inputs: `x` `[M, K]`, `weight` `[N, K]` (PyTorch Linear
/// layout), `bias` `[N]`; result `[M, N]`. One OpenBLAS sgemm per band of about 8 MiB of weight
/// rows (widened from f16/bf16 a band at a time, never whole), bands spread over the workers.
///
/// OpenBLAS rounds a row differently depending on where it falls in its micro-kernel tiles, so a
/// row's result depends on the other rows of the call. Callers that need a row to be computed
/// exactly as it would be alone (batched decoding) use `linearPerRow`.
public func linear(_ x: Matrix, _ weight: WeightMatrix, bias: [Float]? = nil) -> Matrix {
    bandedProduct(x, weight, bias: bias, bandBytes: 8 << 20) { xBase, yBase, range, bandWeights in
        BLAS.sgemm(m: x.rows, n: range.count, k: weight.columns, a: xBase, lda: weight.columns, b: bandWeights, ldb: weight.columns,
                   transposeB: true, c: yBase + range.lowerBound, ldc: weight.rows)
    }
}

/// `y = x · Wᵀ + bias` where every row of `x` is multiplied alone, so row `r`'s result is
/// bit-identical whatever other rows `x` holds: the decode path, where a batch of N must equal
/// N batches of 1.
///
/// Why not one sgemm: OpenBLAS's sgemm rounds a row differently depending on its place in the
/// micro-kernel tiles, hence on M (measured: padding M to a multiple of 16 does not help either).
/// Each row is therefore an OpenBLAS sgemv (a dot product per output, its order fixed by the
/// weight band alone), which also costs a third of an M = 1 sgemm call. Weight bands (about
/// 4 MiB widened) are widened once and reused by every row while they sit in cache, so the
/// weights stream from memory once per call whatever the batch size.
public func linearPerRow(_ x: Matrix, _ weight: WeightMatrix, bias: [Float]? = nil) -> Matrix {
    bandedProduct(x, weight, bias: bias, bandBytes: 4 << 20) { xBase, yBase, range, bandWeights in
        for r in 0..<x.rows {
            BLAS.sgemv(n: range.count, k: weight.columns, a: bandWeights, lda: weight.columns, x: xBase + r * weight.columns,
                       y: yBase + r * weight.rows + range.lowerBound)
        }
    }
}

/// The frame `linear` and `linearPerRow` share: `[M, N]` output, `product(x, y, rows, band)` per
/// weight band on the workers (each writes only its band's columns of `y`), then the bias.
func bandedProduct(_ x: Matrix, _ weight: WeightMatrix, bias: [Float]?, bandBytes: Int,
                   _ product: @escaping @Sendable (UnsafePointer<Float>, UnsafeMutablePointer<Float>, Range<Int>, UnsafePointer<Float>) -> Void) -> Matrix {
    precondition(x.columns == weight.columns, "linear: input has \(x.columns) features, weight expects \(weight.columns)")
    let m = x.rows, n = weight.rows
    var output = [Float](repeating: 0, count: m * n)
    if m > 0 && n > 0 {
        x.values.withUnsafeBufferPointer { xp in
            output.withUnsafeMutableBufferPointer { yp in
                let pointers = UncheckedSendable((xp.baseAddress!, yp.baseAddress!))
                forEachBand(of: weight, rows: bandRows(weight, bytes: bandBytes)) { range, bandWeights in
                    product(pointers.value.0, pointers.value.1, range, bandWeights)
                }
            }
        }
    }
    if let bias { addBias(&output, bias, rows: m) }
    return Matrix(rows: m, columns: n, values: output)
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
