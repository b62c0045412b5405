// The matrix products as one table of operations x CPU paths, in the manner of llama.cpp's
// test-backend-ops: every operation (f32 products on f32, f16 and bf16 weights; bf16 products on
// the same; 8-bit products) x M in `rowCounts` x odd N and K, on each path, bit for bit against
// the plain twin that sums in the kernels' order and within a tolerance of a double-precision
// product that grows with K and the dtype. Each path is its own test, so a path this CPU cannot
// run shows as a skipped test with its reason, never as a loop that quietly does less.
import CKernels
import Foundation
import Testing
@testable import Numerics

/// One operation of the table: a product at a precision on a weight's storage type.
struct KernelOperation: Sendable, CustomStringConvertible {
    let precision: Precision
    let storage: StorageType

    var description: String { "\(precision.rawValue) on \(storage.rawValue) weights" }

    static let all: [KernelOperation] =
        [StorageType.float32, .float16, .bfloat16].flatMap { storage in Precision.allCases.map { KernelOperation(precision: $0, storage: storage) } }
        + [KernelOperation(precision: .f32, storage: .q8)]

    /// The plain twin in the kernels' order, which every path but AMX at bf16 equals bit for bit.
    func twin(_ x: Matrix, _ weight: WeightMatrix) -> Matrix {
        if storage == .q8 { return ReferenceKernels.linearQ8InKernelOrder(x, weight) }
        return precision == .f32 ? ReferenceKernels.linearInKernelOrder(x, weight) : ReferenceKernels.linearBF16InKernelOrder(x, weight)
    }

    /// Checks `result` against the double-precision product of `x` and the (dequantized) weight:
    /// f32, relative to the largest output, K times 4 units of f32 rounding; bf16, operands
    /// rounded to 8 significant bits, 2e-2; q8, per output, `q8ErrorBound` (which grows with K).
    func expectNearExact(_ result: Matrix, _ x: Matrix, _ weight: WeightMatrix, _ label: String) {
        let dequantized = weight.widened(), k = x.columns, n = weight.rows
        let exact = ReferenceKernels.linear(x, dequantized, outFeatures: n)
        switch (storage, precision) {
        case (.q8, _):
            for r in stride(from: 0, to: x.rows, by: max(1, x.rows / 9)) {
                for o in 0..<n {
                    let bound = q8ErrorBound(Array(x.values[r * k ..< (r + 1) * k]), Array(dequantized[o * k ..< (o + 1) * k]))
                    let error = (result.values[r * n + o] - exact.values[r * n + o]).magnitude
                    #expect(error <= bound, "\(label) (\(r), \(o)): error \(error), bound \(bound)")
                }
            }
        case (_, .f32): #expect(maxRelativeDifference(result.values, exact.values) < Float(k) * 1.2e-7 * 4, "\(label)")
        case (_, .bf16): #expect(maxRelativeDifference(result.values, exact.values) < 2e-2, "\(label)")
        }
    }
}

/// One cell of the table: `operation` on `path` with `rows` rows.
func checkKernel(_ operation: KernelOperation, rows: Int, on path: KernelPath) {
    let (x, weight, _) = kernelOperands(storage: operation.storage, rows: rows, seed: 31 + UInt64(rows))
    let label = "\(path) \(operation) M=\(rows)"
    let fast = linear(x, weight, path: path, precision: operation.precision)
    operation.expectNearExact(fast, x, weight, label)
    if path == .amx && operation.precision == .bf16 && operation.storage != .q8 { return }  // AMX adds in its own order
    #expect(firstBitDifference(fast.values, operation.twin(x, weight).values) == nil, "\(label)")
}

@Suite struct KernelTableTests {
    @Test("reference path: every operation x M", arguments: KernelOperation.all, rowCounts)
    func reference(operation: KernelOperation, rows: Int) { checkKernel(operation, rows: rows, on: .reference) }

    @Test("scalar path: every operation x M", arguments: KernelOperation.all, rowCounts)
    func scalar(operation: KernelOperation, rows: Int) { checkKernel(operation, rows: rows, on: .scalar) }

    @Test("avx2 path: every operation x M", .enabled(if: KernelPath.avx2.isAvailable, "this CPU has no AVX2+FMA+F16C"),
          arguments: KernelOperation.all, rowCounts)
    func avx2(operation: KernelOperation, rows: Int) { checkKernel(operation, rows: rows, on: .avx2) }

    @Test("avx512 path: every operation x M", .enabled(if: KernelPath.avx512.isAvailable, "this CPU has no AVX-512 F/BW/VL/DQ"),
          arguments: KernelOperation.all, rowCounts)
    func avx512(operation: KernelOperation, rows: Int) { checkKernel(operation, rows: rows, on: .avx512) }

    @Test("avx512bf16 path (vdpbf16ps): every operation x M", .enabled(if: KernelPath.avx512bf16.isAvailable, "this CPU has no AVX512-BF16"),
          arguments: KernelOperation.all, rowCounts)
    func avx512bf16(operation: KernelOperation, rows: Int) { checkKernel(operation, rows: rows, on: .avx512bf16) }

    @Test("amx path: every operation x M", .enabled(if: KernelPath.amx.isAvailable, "this CPU or OS has no AMX-BF16"),
          arguments: KernelOperation.all, rowCounts)
    func amx(operation: KernelOperation, rows: Int) { checkKernel(operation, rows: rows, on: .amx) }
}
