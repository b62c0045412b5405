// Every fast kernel against its plain double-precision twin in ReferenceKernels.
import Foundation
import Testing
@testable import Numerics

/// Deterministic pseudo-random floats in [-scale, scale].
func randomValues(_ count: Int, seed: UInt64, scale: Float = 1) -> [Float] {
    var state = seed &* 6364136223846793005 &+ 1442695040888963407
    return (0..<count).map { _ in
        state = state &* 6364136223846793005 &+ 1442695040888963407
        return (Float(state >> 40) / Float(1 << 24) * 2 - 1) * scale
    }
}

func maxRelativeDifference(_ a: [Float], _ b: [Float]) -> Float {
    precondition(a.count == b.count)
    let norm = b.reduce(Float(0)) { max($0, abs($1)) }
    return zip(a, b).reduce(Float(0)) { max($0, abs($1.0 - $1.1)) } / max(norm, 1e-30)
}

@Suite struct KernelTests {
    @Test("linear equals the triple loop, for every storage type and batch size",
          arguments: [StorageType.float32, .float16, .bfloat16], [1, 3, 17, 40])
    func linearMatchesReference(storage: StorageType, rows: Int) {
        let k = 96, n = 70
        let weight = WeightMatrix(rows: n, columns: k, values: randomValues(n * k, seed: 1), storageType: storage)
        let bias = randomValues(n, seed: 2)
        let x = Matrix(rows: rows, columns: k, values: randomValues(rows * k, seed: 3))
        let fast = linear(x, weight, bias: bias)
        // The reference sees the weight exactly as stored (already rounded).
        let plain = ReferenceKernels.linear(x, weight.widened(), outFeatures: n, bias: bias)
        #expect(fast.rows == rows && fast.columns == n)
        #expect(maxRelativeDifference(fast.values, plain.values) < 1e-5)
    }

    @Test("linear gives the same bits with any number of worker threads", arguments: [StorageType.float32, .float16])
    func linearIsThreadCountInvariant(storage: StorageType) {
        defer { Parallelism.setThreads(1) }
        let k = 700, n = 3000
        let weight = WeightMatrix(rows: n, columns: k, values: randomValues(n * k, seed: 21), storageType: storage)
        let x = Matrix(rows: 45, columns: k, values: randomValues(45 * k, seed: 22))
        Parallelism.setThreads(1)
        let one = linear(x, weight)
        Parallelism.setThreads(2)
        #expect(firstBitDifference(linear(x, weight).values, one.values) == nil)
        Parallelism.setThreads(4)
        #expect(firstBitDifference(linear(x, weight).values, one.values) == nil)
    }

    @Test("f16 and bf16 widening round-trips representable values and rounds to nearest even")
    func narrowingAndWidening() {
        let values: [Float] = [0, -0, 1, -2.5, 65504, 6.1035156e-05, 5.9604645e-08, 1.0009766, .infinity, -.infinity]
        let half = WeightMatrix(rows: 1, columns: values.count, values: values, storageType: .float16).widened()
        #expect(half == values)
        // 1 + 2^-11 is halfway between two halves: ties to even (1.0).
        #expect(WeightMatrix(rows: 1, columns: 1, values: [1 + 1.0 / 2048], storageType: .float16).widened() == [1])
        let brain = WeightMatrix(rows: 1, columns: 4, values: [1, -3, 1.0078125, 3.3895314e38], storageType: .bfloat16).widened()
        #expect(brain == [1, -3, 1.0078125, 3.3895314e38])
        #expect(WeightMatrix(rows: 1, columns: 1, values: [1 + 1.0 / 256], storageType: .bfloat16).widened() == [1])
        // Swift's own Float16 conversion agrees with the kernel on many values.
        let many = randomValues(4096, seed: 9, scale: 1000)
        let widened = WeightMatrix(rows: 1, columns: many.count, values: many, storageType: .float16).widened()
        #expect(widened == many.map { Float(Float16($0)) })
    }

    @Test("RMSNorm and LayerNorm match the plain formulas")
    func norms() {
        let x = Matrix(rows: 5, columns: 64, values: randomValues(320, seed: 6, scale: 3))
        let weight = randomValues(64, seed: 7), bias = randomValues(64, seed: 8)
        #expect(maxRelativeDifference(rmsNorm(x, weight: weight, epsilon: 1e-5).values,
                                      ReferenceKernels.rmsNorm(x, weight: weight, epsilon: 1e-5).values) < 1e-5)
        #expect(maxRelativeDifference(layerNorm(x, weight: weight, bias: bias, epsilon: 1e-5).values,
                                      ReferenceKernels.layerNorm(x, weight: weight, bias: bias, epsilon: 1e-5).values) < 1e-5)
    }

    @Test("exact GELU, quick_gelu and SiLU match their formulas on every path, with the same bits on every path; NaN spreads",
          arguments: [Activation.gelu, .quickGELU, .silu])
    func activations(_ kind: Activation) {
        // 16387 values: more than one block of the workers, and a tail past the vector width.
        let inputs = randomValues(16387, seed: 10, scale: 8) + [0, -0.0, -20, 20, -100, 100, .infinity, .nan]
        var first: [Float]?
        for path in KernelPath.allCases where path.isAvailable {
            var x = Matrix(rows: 1, columns: inputs.count, values: inputs)
            activate(&x, kind, path: path)
            for (input, y) in zip(inputs, x.values) where !input.isNaN {
                let expected = ReferenceKernels.activation(input, kind)
                #expect(abs(y - expected) <= 1e-6 * max(1, abs(expected)) || y == expected, "\(kind)(\(input)) on \(path): \(y)")
            }
            #expect(x.values.last!.isNaN)
            if let first { #expect(x.values.map(\.bitPattern) == first.map(\.bitPattern), "\(path)") } else { first = x.values }
        }
    }

    @Test("the SwiGLU product silu(gate) · up is the activation times up, with the same bits on every path")
    func siluGateIsTheActivationTimesUp() {
        let gate = Matrix(rows: 3, columns: 6001, values: randomValues(18003, seed: 16, scale: 6))
        let up = Matrix(rows: 3, columns: 6001, values: randomValues(18003, seed: 17, scale: 2))
        var first: [Float]?
        for path in KernelPath.allCases where path.isAvailable {
            var silu = gate
            activate(&silu, .silu, path: path)
            let product = siluGate(gate, up, path: path)
            #expect(product.values.map(\.bitPattern) == zip(silu.values, up.values).map { ($0 * $1).bitPattern }, "\(path)")
            if let first { #expect(product.values.map(\.bitPattern) == first.map(\.bitPattern), "\(path)") } else { first = product.values }
        }
    }

    @Test("softmax: every path gives the same bits, within 1e-6 of the exact one; -infinity masks, a fully masked row is zeros, NaN spreads",
          arguments: [1, 15, 16, 17, 50, 577, 1000])
    func softmax(count: Int) {
        var row = randomValues(count, seed: 11 + UInt64(count), scale: 40)
        if count > 3 { row[3] = -.infinity }
        if count > 40 { row[40] = row.max()! - 90 }  // below the exp cut-off: exactly 0
        let expected = ReferenceKernels.softmax(row)
        var first: [Float]?
        for path in KernelPath.allCases where path.isAvailable {
            var result = row
            result.withUnsafeMutableBufferPointer { softmaxInPlace($0.baseAddress!, count: $0.count, path: path) }
            #expect(maxRelativeDifference(result, expected) < 1e-6, "\(path)")
            #expect(abs(result.reduce(0, +) - 1) < 1e-5, "\(path)")
            if count > 3 { #expect(result[3] == 0, "\(path)") }
            if count > 40 { #expect(result[40] == 0, "\(path)") }
            if let first { #expect(result.map(\.bitPattern) == first.map(\.bitPattern), "\(path)") } else { first = result }
            var masked = [Float](repeating: -.infinity, count: count)
            masked.withUnsafeMutableBufferPointer { softmaxInPlace($0.baseAddress!, count: count, path: path) }
            #expect(masked.allSatisfy { $0 == 0 }, "\(path)")
            var poisoned = row
            poisoned[count / 2] = .nan
            poisoned.withUnsafeMutableBufferPointer { softmaxInPlace($0.baseAddress!, count: count, path: path) }
            #expect(poisoned.allSatisfy { $0.isNaN }, "\(path)")
        }
        let logProbabilities = logSoftmax([1, 2, 3])
        #expect(abs(logProbabilities.map { expf($0) }.reduce(0, +) - 1) < 1e-6)
    }

    @Test("RoPE rotates pairs (i, i + d/2) by position times inverse frequency")
    func rotaryEmbedding() {
        let heads = 3, d = 16
        let positions: [Int32] = [0, 1, 7, 600, 4095]
        var x = Matrix(rows: positions.count, columns: heads * d, values: randomValues(positions.count * heads * d, seed: 12))
        let expected = ReferenceKernels.rope(x, heads: heads, headDimension: d, positions: positions, theta: 10000)
        RotaryEmbedding(headDimension: d, theta: 10000).apply(&x, heads: heads, positions: positions)
        // Angles are computed in f32 as transformers does (position * inverse frequency), so at
        // position 4095 they carry a relative rounding of ~1e-7 of a large angle.
        #expect(maxRelativeDifference(x.values, expected.values) < 1e-4)
        #expect(maxRelativeDifference(x.rows(0..<3).values, expected.rows(0..<3).values) < 1e-6)
    }

    @Test("multi-head attention with GQA and a mask matches the loop version, for a prompt and for one query, K/V in f32 or bf16",
          arguments: [5, 1], [StorageType.float32, .bfloat16])
    func attention(queries: Int, storage: StorageType) {
        let heads = 4, kvHeads = 2, d = 8, keys = 9
        let q = Matrix(rows: queries, columns: heads * d, values: randomValues(queries * heads * d, seed: 13))
        let k = storedValues(randomValues(keys * kvHeads * d, seed: 14), as: storage)
        let v = storedValues(randomValues(keys * kvHeads * d, seed: 15), as: storage)
        let visible: (Int, Int) -> Bool = { query, key in key <= query + 4 && key != 2 }
        var mask = [Float](repeating: 0, count: queries * keys)
        for i in 0..<queries { for j in 0..<keys where !visible(i, j) { mask[i * keys + j] = -.infinity } }
        var out = [Float](repeating: 0, count: queries * heads * d)
        q.values.withUnsafeBufferPointer { qp in
            k.bytes.withUnsafeBytes { kp in
                v.bytes.withUnsafeBytes { vp in
                    out.withUnsafeMutableBufferPointer { op in
                        multiHeadAttention(queries: qp.baseAddress!, queryStride: heads * d, queryCount: queries,
                                           keys: kp.baseAddress!, keyStride: kvHeads * d, values: vp.baseAddress!,
                                           valueStride: kvHeads * d, keyCount: keys, keyValueType: storage, heads: heads, keyValueHeads: kvHeads,
                                           headDimension: d, scale: 0.3, mask: mask, output: op.baseAddress!, outputStride: heads * d)
                    }
                }
            }
        }
        let expected = ReferenceKernels.attention(queries: q, keys: Matrix(rows: keys, columns: kvHeads * d, values: k.widened),
                                                  values: Matrix(rows: keys, columns: kvHeads * d, values: v.widened), heads: heads,
                                                  keyValueHeads: kvHeads, headDimension: d, scale: 0.3, visible: visible)
        #expect(maxRelativeDifference(out, expected.values) < 1e-5)
    }
}
