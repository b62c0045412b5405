// The 8-bit kernels as the float ones are tested (MatrixKernelTests; the table of paths x batch
// sizes x odd shapes against the plain twin is KernelTableTests): quantization, NaN/Inf, guard
// values around the output, row and thread invariance.
import CKernels
import Foundation
import Testing
@testable import Numerics

/// A bound on |q8 product - exact product of x with the dequantized weight| for one output:
/// each activation is off by at most half its block's step (amax / 254), plus f32 rounding.
func q8ErrorBound(_ x: [Float], _ dequantized: [Float]) -> Float {
    let size = Q8Layout.blockSize
    var bound: Float = 0, magnitude: Float = 0
    for start in stride(from: 0, to: x.count, by: size) {
        let block = start ..< min(x.count, start + size)
        let amax = x[block].reduce(Float(0)) { max($0, $1.magnitude) }
        for i in block {
            bound += amax / 254 * dequantized[i].magnitude
            magnitude += (x[i] * dequantized[i]).magnitude
        }
    }
    return bound * 1.01 + magnitude * Float(x.count) * 2.4e-7 + 1e-30
}

@Suite struct Q8KernelTests {
    @Test("q8 weights hold each value within half a step of its block's scale; the padding is zero")
    func weightQuantizationRoundTrips() throws {
        let rows = 5, columns = 75  // three blocks per row, the last one 11 wide
        let values = wideRangeValues(rows * columns, seed: 93)
        let weight = WeightMatrix(rows: rows, columns: columns, values: values, storageType: .q8)
        #expect(weight.byteCount == rows * 3 * 34)
        let restored = weight.widened()
        let scales = weight.scales!.assumingMemoryBound(to: UInt16.self)
        let quants = weight.base.assumingMemoryBound(to: Int8.self)
        for r in 0..<rows {
            for b in 0..<3 {
                let scale = Float(Float16(bitPattern: scales[r * 3 + b]))
                for c in b * 32 ..< min(columns, (b + 1) * 32) {
                    #expect((restored[r * columns + c] - values[r * columns + c]).magnitude <= scale * 0.5 + scale * 1e-3,
                            "(\(r), \(c))")
                }
            }
            for c in columns..<96 { #expect(quants[r * 96 + c] == 0) }
        }
        #expect(WeightMatrix(rows: 1, columns: 3, values: [1, .infinity, 2]).quantizedQ8() == nil)
        #expect(WeightMatrix(rows: 1, columns: 2, values: [1e9, 2]).quantizedQ8() == nil)
    }

    @Test("q8: a row's result is the same alone, in any batch, at any position and with any thread count")
    func rowsAreBatchAndThreadInvariant() {
        defer { Parallelism.setThreads(1) }
        let k = 301, n = 531
        let weight = WeightMatrix(rows: n, columns: k, values: randomValues(n * k, seed: 95), storageType: .q8)
        let bias = randomValues(n, seed: 96)
        let x = Matrix(rows: 33, columns: k, values: randomValues(33 * k, seed: 97))
        for path in kernelPaths where path != .reference {
            Parallelism.setThreads(1)
            let batched = linear(x, weight, bias: bias, path: path)
            for r in 0..<33 {
                #expect(firstBitDifference(linear(x.rows(r..<r + 1), weight, bias: bias, path: path).values, batched.row(r)) == nil,
                        "\(path) row \(r)")
            }
            for threads in [2, 3] {
                Parallelism.setThreads(threads)
                #expect(firstBitDifference(linear(x, weight, bias: bias, path: path).values, batched.values) == nil, "\(path) \(threads) threads")
            }
            let shuffled = linear(x.gatherRows([32, 7, 0, 16, 7]), weight, bias: bias, path: path)
            for (position, row) in [32, 7, 0, 16, 7].enumerated() {
                #expect(firstBitDifference(shuffled.row(position), batched.row(row)) == nil, "\(path) row \(row) at \(position)")
            }
        }
    }

    @Test("q8: NaN or infinity in an activation makes exactly its row NaN, on every path")
    func nanAndInfinityPropagate() {
        let k = 45, n = 21, rows = 9
        let weight = WeightMatrix(rows: n, columns: k, values: randomValues(n * k, seed: 98), storageType: .q8)
        var xValues = randomValues(rows * k, seed: 99)
        xValues[2 * k + 40] = .nan
        xValues[5 * k + 3] = -.infinity
        let x = Matrix(rows: rows, columns: k, values: xValues)
        for path in kernelPaths {
            let y = linear(x, weight, path: path)
            for r in 0..<rows {
                for c in 0..<n {
                    let value = y.values[r * n + c]
                    if r == 2 || r == 5 { #expect(value.isNaN, "\(path) (\(r), \(c))") }
                    else { #expect(value.isFinite, "\(path) (\(r), \(c))") }
                }
            }
        }
    }

    @Test("q8: the kernel writes only its rows and columns: guard values around the output stay")
    func guardBytesStayUntouched() {
        let k = 77, n = 50, rows = 13, stride = 64, columns = 9 ..< 43
        let weight = WeightMatrix(rows: n, columns: k, values: randomValues(n * k, seed: 101), storageType: .q8)
        let x = randomValues(rows * k, seed: 102)
        let sentinel = Float(bitPattern: 0x7FC0_DEAD)
        let expected = ReferenceKernels.linearQ8InKernelOrder(Matrix(rows: rows, columns: k, values: x), weight)
        let records = OwnedStorage(byteCount: rows * dl_q8_activation_row_bytes(k))
        x.withUnsafeBufferPointer { dl_quantize_activations_q8($0.baseAddress!, k, rows, k, records.pointer) }
        for path in kernelPaths where path != .reference {
            var y = [Float](repeating: sentinel, count: (rows + 4) * stride)
            y.withUnsafeMutableBufferPointer { yp in
                dl_gemm_q8(path.cValue, records.pointer, rows, weight.base.assumingMemoryBound(to: Int8.self),
                           weight.scales!.assumingMemoryBound(to: UInt16.self), k, columns.lowerBound, columns.upperBound,
                           yp.baseAddress! + 2 * stride, stride, 4)
            }
            expectGuardedOutput(y, expected: expected, columns: columns, stride: stride, sentinel: sentinel, path: path)
        }
    }

    @Test("a quant of -128 lies outside the format and is found")
    func invalidQuantIsFound() {
        let quants: [Int8] = [0, 127, -127, 5, -128, 3]
        #expect(dl_q8_find_invalid_quant(quants, quants.count) == 4)
        #expect(dl_q8_find_invalid_quant(quants, 4) == -1)
    }
}
