// The native matrix kernels beyond the table of KernelTableTests (operations x paths x batch
// sizes against the plain twins): NaN/Inf propagation, guard bytes around outputs, row
// invariance across batches and thread counts, and attention's products.
import CKernels
import Foundation
import Testing
@testable import Numerics

/// Values across the range a weight or activation can take: mostly unit-sized, some tiny
/// (f16 subnormal, f32 subnormal, bf16 products below f32's normal range) and some large, with
/// both signs.
func wideRangeValues(_ count: Int, seed: UInt64) -> [Float] {
    let base = randomValues(count, seed: seed)
    return base.enumerated().map { i, v in
        switch i % 29 {
        case 3: v * 1e-6
        case 7: v * 1e-39
        case 11: v * 300
        case 13: v * 1e-20  // two of these multiply to an f32 subnormal, which vdpbf16ps flushes
        default: v
        }
    }
}

let kernelPaths = KernelPath.allCases.filter(\.isAvailable)

/// The first index where the two arrays' bits differ (nil when identical), with both values: a
/// failure message that stays short (comparing large arrays in `#expect` would print them whole).
func firstBitDifference(_ a: [Float], _ b: [Float]) -> String? {
    guard a.count == b.count else { return "counts \(a.count) and \(b.count)" }
    guard let i = a.indices.first(where: { a[$0].bitPattern != b[$0].bitPattern }) else { return nil }
    return "element \(i): \(a[i]) vs \(b[i]) (\(a.indices.filter { a[$0].bitPattern != b[$0].bitPattern }.count) differ)"
}
let rowCounts = [1, 2, 3, 7, 8, 9, 16, 17, 64, 577, 1000]

/// `rows` activations and a `[37, K]` weight of wide-ranging values (K = 133, or 53 for the large
/// batches), and their double-precision product.
func kernelOperands(storage: StorageType, rows: Int, seed: UInt64) -> (x: Matrix, weight: WeightMatrix, exact: Matrix) {
    let k = rows > 100 ? 53 : 133, n = 37
    let weight = WeightMatrix(rows: n, columns: k, values: wideRangeValues(n * k, seed: seed), storageType: storage)
    let x = Matrix(rows: rows, columns: k, values: wideRangeValues(rows * k, seed: seed + 1 + UInt64(rows)))
    return (x, weight, ReferenceKernels.linear(x, weight.widened(), outFeatures: n))
}

@Suite struct MatrixKernelTests {
    @Test("bf16 on AMX: guard values around the output stay, and rows past a 32-row block and K past a 32-wide tile are right",
          .enabled(if: KernelPath.amx.isAvailable, "this CPU or OS has no AMX-BF16"), arguments: [StorageType.float32, .float16, .bfloat16])
    func amxWritesOnlyItsOutput(storage: StorageType) {
        let k = 77, n = 50, rows = 37, stride = 64, columns = 16 ..< 43
        let weight = WeightMatrix(rows: n, columns: k, values: randomValues(n * k, seed: 63), storageType: storage)
        let x = Matrix(rows: rows, columns: k, values: randomValues(rows * k, seed: 64))
        let expected = linear(x, weight, path: .amx, precision: .bf16)
        let exact = ReferenceKernels.linear(x, weight.widened(), outFeatures: n)
        #expect(maxRelativeDifference(expected.values, exact.values) < 2e-2)
        let rounded = x.values.map { value in
            var bits: UInt16 = 0
            withUnsafePointer(to: value) { dl_narrow_bf16($0, &bits, 1) }
            return bits
        }
        let sentinel = Float(bitPattern: 0x7FC0_DEAD)
        var y = [Float](repeating: sentinel, count: (rows + 4) * stride)
        let panels = weight.panelsBF16()
        rounded.withUnsafeBufferPointer { xp in
            y.withUnsafeMutableBufferPointer { yp in
                dl_gemm_amx(xp.baseAddress!, k, rows, panels, k, columns.lowerBound, columns.upperBound, yp.baseAddress! + 2 * stride, stride)
            }
        }
        expectGuardedOutput(y, expected: expected, columns: columns, stride: stride, sentinel: sentinel, path: .amx)
    }

    @Test("a row's result is the same alone, in any batch, at any position and with any thread count",
          arguments: [StorageType.float32, .float16, .bfloat16])
    func rowsAreBatchAndThreadInvariant(storage: StorageType) {
        defer { Parallelism.setThreads(1) }
        let k = 301, n = 531
        let weight = WeightMatrix(rows: n, columns: k, values: randomValues(n * k, seed: 41), storageType: storage)
        let bias = randomValues(n, seed: 42)
        // 61 rows: a batch large enough that f16 and bf16 panels are widened to f32 first, unlike one row.
        let x = Matrix(rows: 61, columns: k, values: randomValues(61 * k, seed: 43))
        let cases = kernelPaths.filter { $0 != .reference }.flatMap { path in Precision.allCases.map { (path, $0) } }
        for (path, precision) in cases {
            Parallelism.setThreads(1)
            let batched = linear(x, weight, bias: bias, path: path, precision: precision)
            for r in 0..<61 {
                #expect(firstBitDifference(linear(x.rows(r..<r + 1), weight, bias: bias, path: path, precision: precision).values, batched.row(r)) == nil,
                        "\(path) \(precision) row \(r)")
            }
            for threads in [2, 3] {
                Parallelism.setThreads(threads)
                #expect(firstBitDifference(linear(x, weight, bias: bias, path: path, precision: precision).values, batched.values) == nil,
                        "\(path) \(precision) \(threads) threads")
            }
            let shuffled = linear(x.gatherRows([60, 7, 0, 33, 7]), weight, bias: bias, path: path, precision: precision)
            for (position, row) in [60, 7, 0, 33, 7].enumerated() {
                #expect(firstBitDifference(shuffled.row(position), batched.row(row)) == nil, "\(path) \(precision) row \(row) at \(position)")
            }
        }
    }

    @Test("NaN and infinity propagate to exactly the outputs they touch, on every path, at f32 and bf16", arguments: Precision.allCases)
    func nanAndInfinityPropagate(precision: Precision) {
        let k = 45, n = 21, rows = 9
        var weightValues = randomValues(n * k, seed: 51)
        weightValues[5 * k + 17] = .infinity  // column 5
        var xValues = randomValues(rows * k, seed: 52)
        xValues[2 * k + 40] = .nan             // row 2
        let weight = WeightMatrix(rows: n, columns: k, values: weightValues, storageType: .float16)
        let x = Matrix(rows: rows, columns: k, values: xValues)
        for path in kernelPaths {
            let y = linear(x, weight, path: path, precision: precision)
            for r in 0..<rows {
                for c in 0..<n {
                    let value = y.values[r * n + c]
                    if r == 2 { #expect(value.isNaN, "\(path) \(precision) (\(r), \(c))") }
                    else if c == 5 { #expect(value.isInfinite || value.isNaN, "\(path) \(precision) (\(r), \(c))") }
                    else { #expect(value.isFinite, "\(path) \(precision) (\(r), \(c))") }
                }
            }
        }
    }

    @Test("the kernels write only their rows and columns: guard values around the output stay",
          arguments: [StorageType.float32, .float16, .bfloat16])
    func guardBytesStayUntouched(storage: StorageType) {
        let k = 77, n = 50, rows = 13, stride = 64
        let weight = WeightMatrix(rows: n, columns: k, values: randomValues(n * k, seed: 61), storageType: storage)
        let x = randomValues(rows * k, seed: 62)
        let sentinel = Float(bitPattern: 0x7FC0_DEAD)
        let input = Matrix(rows: rows, columns: k, values: x)
        // Row-major dot products (attention's scores) from any column; packed panels from a
        // multiple of 16 to a column inside the last panel.
        let laneOrder = ReferenceKernels.dotProductsInLaneOrder(input, weight)
        let chainOrder = ReferenceKernels.linearInKernelOrder(input, weight)
        let panels = weight.panels()
        for path in kernelPaths where path != .reference {
            for usesPanels in [false, true] {
                let (columns, expected) = usesPanels ? (16 ..< 43, chainOrder) : (9 ..< 43, laneOrder)
                // Two guard rows before and after, and columns outside `columns` in every row.
                var y = [Float](repeating: sentinel, count: (rows + 4) * stride)
                x.withUnsafeBufferPointer { xp in
                    y.withUnsafeMutableBufferPointer { yp in
                        if !usesPanels {
                            dl_gemm(path.cValue, storage.kernelType, xp.baseAddress!, k, rows, weight.base, k, k,
                                    columns.lowerBound, columns.upperBound, yp.baseAddress! + 2 * stride, stride, 6)
                        } else {
                            dl_gemm_panels(path.cValue, storage.kernelType, xp.baseAddress!, k, rows, panels, k,
                                           columns.lowerBound, columns.upperBound, yp.baseAddress! + 2 * stride, stride)
                        }
                    }
                }
                expectGuardedOutput(y, expected: expected, columns: columns, stride: stride, sentinel: sentinel, path: path)
            }
        }
    }

    @Test("bf16: products and sums below f32's normal range are flushed to zero on every path, as vdpbf16ps flushes them")
    func bf16FlushesSubnormalResults() {
        // Every product about 1e-41 and every partial sum below 2^-126: each step is flushed to ±0.
        let k = 301, n = 37, rows = 9
        let weight = WeightMatrix(rows: n, columns: k, values: randomValues(n * k, seed: 67).map { $0 * 1e-20 }, storageType: .float32)
        let x = Matrix(rows: rows, columns: k, values: randomValues(rows * k, seed: 68).map { $0 * 1e-20 })
        let twin = ReferenceKernels.linearBF16InKernelOrder(x, weight)
        #expect(twin.values.allSatisfy { $0 == 0 })
        for path in kernelPaths where path != .amx {
            #expect(firstBitDifference(linear(x, weight, path: path, precision: .bf16).values, twin.values) == nil, "\(path)")
        }
    }

    @Test("bf16 panels: guard values around the output stay on every path, for odd K and a short last panel",
          arguments: [StorageType.float32, .float16, .bfloat16])
    func bf16PanelsWriteOnlyTheirOutput(storage: StorageType) {
        let k = 77, n = 50, rows = 17, stride = 64, columns = 16 ..< 43
        let weight = WeightMatrix(rows: n, columns: k, values: wideRangeValues(n * k, seed: 65), storageType: storage)
        let x = Matrix(rows: rows, columns: k, values: wideRangeValues(rows * k, seed: 66))
        let expected = ReferenceKernels.linearBF16InKernelOrder(x, weight)
        var rounded = [UInt16](repeating: 0, count: rows * k)
        dl_narrow_bf16(x.values, &rounded, rows * k)
        let sentinel = Float(bitPattern: 0x7FC0_DEAD)
        let panels = weight.panelsBF16()
        for path in kernelPaths where path != .reference && path != .amx {
            let cPath = path == .avx512bf16 ? Int32(DL_PATH_AVX512_BF16) : path.cValue
            var y = [Float](repeating: sentinel, count: (rows + 4) * stride)
            rounded.withUnsafeBufferPointer { xp in
                y.withUnsafeMutableBufferPointer { yp in
                    dl_gemm_bf16_panels(cPath, xp.baseAddress!, k, rows, panels, k, columns.lowerBound, columns.upperBound,
                                        yp.baseAddress! + 2 * stride, stride)
                }
            }
            expectGuardedOutput(y, expected: expected, columns: columns, stride: stride, sentinel: sentinel, path: path)
        }
    }

    @Test("one query's attention has the same bits on every path and matches the loop version, K/V in f32 or bf16",
          arguments: [StorageType.float32, .bfloat16])
    func singleQueryAttentionIsPathInvariant(storage: StorageType) {
        let heads = 6, kvHeads = 3, d = 20, keys = 37, keyStride = kvHeads * d + 5
        let q = randomValues(heads * d, seed: 81)
        // K/V as the cache stores them, and the same values widened back for the loop version.
        let k = storedValues(randomValues(keys * keyStride, seed: 82), as: storage)
        let v = storedValues(randomValues(keys * keyStride, seed: 83), as: storage)
        func run(_ path: KernelPath) -> [Float] {
            var out = [Float](repeating: 0, count: heads * d)
            q.withUnsafeBufferPointer { qp in
                k.bytes.withUnsafeBytes { kp in
                    v.bytes.withUnsafeBytes { vp in
                        out.withUnsafeMutableBufferPointer { op in
                            singleQueryAttention(query: qp.baseAddress!, keys: kp.baseAddress!, keyStride: keyStride, values: vp.baseAddress!,
                                                 valueStride: keyStride, keyCount: keys, keyValueType: storage, heads: heads,
                                                 group: heads / kvHeads, headDimension: d, scale: 0.2, mask: nil, output: op.baseAddress!,
                                                 probabilities: nil, path: path)
                        }
                    }
                }
            }
            return out
        }
        let dense = { (values: [Float]) in
            Matrix(rows: keys, columns: kvHeads * d, values: (0..<keys).flatMap { j in values[j * keyStride ..< j * keyStride + kvHeads * d] })
        }
        let expected = ReferenceKernels.attention(queries: Matrix(rows: 1, columns: heads * d, values: q), keys: dense(k.widened),
                                                  values: dense(v.widened), heads: heads, keyValueHeads: kvHeads, headDimension: d,
                                                  scale: 0.2) { _, _ in true }
        let scalar = run(.scalar)
        #expect(maxRelativeDifference(scalar, expected.values) < 1e-5)
        for path in kernelPaths where path != .reference {
            #expect(firstBitDifference(run(path), scalar) == nil, "\(path)")
        }
    }

    @Test("a prompt's attention at bf16 on AMX: within bf16 rounding of the loop version, each query row's bits independent of the other rows and of the thread count",
          .enabled(if: KernelPath.amx.isAvailable, "this CPU or OS has no AMX-BF16"), arguments: [StorageType.float32, .bfloat16])
    func promptAttentionOnAMX(storage: StorageType) {
        // K = 40 keys: past one 32-wide tile for the values' product; head dimension 20: a short tile for the scores'.
        let heads = 6, kvHeads = 3, d = 20, keys = 40, keyStride = kvHeads * d + 3, queries = 37
        let q = randomValues(queries * heads * d, seed: 91)
        let k = storedValues(randomValues(keys * keyStride, seed: 92), as: storage)
        let v = storedValues(randomValues(keys * keyStride, seed: 93), as: storage)
        func run(_ count: Int, threads: Int) -> [Float] {
            let previous = Parallelism.threads
            Parallelism.setThreads(threads)
            defer { Parallelism.setThreads(previous) }
            var out = [Float](repeating: 0, count: count * heads * d)
            q.withUnsafeBufferPointer { qp in
                k.bytes.withUnsafeBytes { kp in
                    v.bytes.withUnsafeBytes { vp in
                        out.withUnsafeMutableBufferPointer { op in
                            multiHeadAttention(queries: qp.baseAddress!, queryStride: heads * d, queryCount: count, keys: kp.baseAddress!,
                                               keyStride: keyStride, values: vp.baseAddress!, valueStride: keyStride, keyCount: keys,
                                               keyValueType: storage, heads: heads, keyValueHeads: kvHeads, headDimension: d, scale: 0.2,
                                               mask: nil, output: op.baseAddress!, outputStride: heads * d, path: .amx, precision: .bf16)
                        }
                    }
                }
            }
            return out
        }
        let dense = { (values: [Float]) in
            Matrix(rows: keys, columns: kvHeads * d, values: (0..<keys).flatMap { j in values[j * keyStride ..< j * keyStride + kvHeads * d] })
        }
        let expected = ReferenceKernels.attention(queries: Matrix(rows: queries, columns: heads * d, values: q), keys: dense(k.widened),
                                                  values: dense(v.widened), heads: heads, keyValueHeads: kvHeads, headDimension: d,
                                                  scale: 0.2) { _, _ in true }
        let all = run(queries, threads: 2)
        // Queries, probabilities and values rounded to bf16: within a few bf16 units of the exact result.
        #expect(maxRelativeDifference(all, expected.values) < 3e-2)
        #expect(zip(all, expected.values).map { abs($0 - $1) }.max()! < 2e-2)
        #expect(firstBitDifference(run(queries, threads: 1), all) == nil)
        #expect(firstBitDifference(run(3, threads: 2), Array(all[0 ..< 3 * heads * d])) == nil)
    }

    @Test("DLLAVA_KERNEL names a path; an unknown name is an error")
    func pathNames() {
        #expect(KernelPath(rawValue: "avx512") == .avx512 && KernelPath(rawValue: "reference") == .reference)
        #expect(KernelPath(rawValue: "avx512bf16") == .avx512bf16)
        #expect(KernelPath.reference.isAvailable && KernelPath.scalar.isAvailable)
        #expect(Kernels.best.isAvailable)
    }
}

/// `values` as a K/V cache of `storage` holds them (the bytes of f32, or of bf16 rounded to nearest
/// even), and those stored values widened back to f32.
func storedValues(_ values: [Float], as storage: StorageType) -> (bytes: [UInt8], widened: [Float]) {
    guard storage == .bfloat16 else { return (values.withUnsafeBytes { Array($0) }, values) }
    var halves = [UInt16](repeating: 0, count: values.count)
    dl_narrow_bf16(values, &halves, values.count)
    var widened = [Float](repeating: 0, count: values.count)
    dl_widen_bf16(halves, &widened, values.count)
    return (halves.withUnsafeBytes { Array($0) }, widened)
}

/// Checks a product written into a guarded buffer `y` (row stride `stride`): rows `2..<rows + 2`
/// hold `expected` `[rows, n]` bit for bit in `columns`; every other value is still `sentinel`.
func expectGuardedOutput(_ y: [Float], expected: Matrix, columns: Range<Int>, stride: Int, sentinel: Float, path: KernelPath) {
    let rows = expected.rows, n = expected.columns
    for r in 0..<rows + 4 {
        for c in 0..<stride {
            let value = y[r * stride + c]
            if (2..<rows + 2).contains(r) && columns.contains(c) {
                #expect(value.bitPattern == expected.values[(r - 2) * n + c].bitPattern, "\(path) (\(r - 2), \(c))")
            } else {
                #expect(value.bitPattern == sentinel.bitPattern, "\(path) wrote guard (\(r), \(c))")
            }
        }
    }
}
