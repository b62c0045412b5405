import Foundation
import CKernels

// Element-wise and row-wise kernels on `Matrix`. Each has a plain double-precision twin in
// `ReferenceKernels` that the tests compare against.

/// RMSNorm as LLaMA: `x * rsqrt(mean(x²) + eps) * weight`, per row. `weight` `[columns]`.
public func rmsNorm(_ x: Matrix, weight: [Float], epsilon: Float) -> Matrix {
    precondition(weight.count == x.columns, "rmsNorm: weight has \(weight.count) values, rows have \(x.columns)")
    var output = x
    let n = x.columns
    output.values.withUnsafeMutableBufferPointer { out in
        weight.withUnsafeBufferPointer { w in
            for r in 0..<x.rows {
                let row = out.baseAddress! + r * n
                var sumOfSquares: Float = 0
                for c in 0..<n { sumOfSquares += row[c] * row[c] }
                let scale = 1 / (sumOfSquares / Float(n) + epsilon).squareRoot()
                for c in 0..<n { row[c] = w[c] * (row[c] * scale) }
            }
        }
    }
    return output
}

/// LayerNorm: `(x - mean) / sqrt(var + eps) * weight + bias`, per row (biased variance).
public func layerNorm(_ x: Matrix, weight: [Float], bias: [Float], epsilon: Float) -> Matrix {
    precondition(weight.count == x.columns && bias.count == x.columns, "layerNorm: parameter size differs from \(x.columns)")
    var output = x
    let n = x.columns
    output.values.withUnsafeMutableBufferPointer { out in
        weight.withUnsafeBufferPointer { w in
            bias.withUnsafeBufferPointer { b in
                for r in 0..<x.rows {
                    let row = out.baseAddress! + r * n
                    var sum: Float = 0
                    for c in 0..<n { sum += row[c] }
                    let mean = sum / Float(n)
                    var squares: Float = 0
                    for c in 0..<n { let d = row[c] - mean; squares += d * d }
                    let scale = 1 / (squares / Float(n) + epsilon).squareRoot()
                    for c in 0..<n { row[c] = (row[c] - mean) * scale * w[c] + b[c] }
                }
            }
        }
    }
    return output
}

/// The activations the models use.
public enum Activation: String, Sendable, Codable {
    /// Exact GELU: `0.5 x (1 + erf(x / √2))`.
    case gelu
    /// CLIP's `x * sigmoid(1.702 x)`.
    case quickGELU = "quick_gelu"
    /// `x * sigmoid(x)` (LLaMA's SwiGLU gate).
    case silu

    @inline(__always)
    public func apply(_ x: Float) -> Float {
        switch self {
        case .gelu: return 0.5 * x * (1 + erff(x * 0.70710678118654752))
        case .quickGELU: return x / (1 + expf(-1.702 * x))
        case .silu: return x / (1 + expf(-x))
        }
    }
}

/// Applies `activation` to every element in place, in blocks spread over the workers. quick_gelu
/// and SiLU run `dl_sigmoid_weighted` (the same bits on every path, within 2e-7 relative of the
/// formulas); the exact GELU, which only the projector and predictors use, runs `apply`.
public func activate(_ x: inout Matrix, _ activation: Activation, path: KernelPath = Kernels.path) {
    let count = x.values.count
    x.values.withUnsafeMutableBufferPointer { v in
        let values = UncheckedSendable(v.baseAddress!)
        forEachBlock(count) { range in
            let block = values.value + range.lowerBound
            switch activation {
            case .gelu: for i in 0..<range.count { block[i] = activation.apply(block[i]) }
            case .quickGELU: dl_sigmoid_weighted(path.cValue, block, nil, range.count, 1.702)
            case .silu: dl_sigmoid_weighted(path.cValue, block, nil, range.count, 1)
            }
        }
    }
}

/// LLaMA's gated FFN inner product: `silu(gate) * up`, element-wise; shapes equal.
public func siluGate(_ gate: Matrix, _ up: Matrix, path: KernelPath = Kernels.path) -> Matrix {
    precondition(gate.values.count == up.values.count, "siluGate: shapes differ")
    var output = gate
    output.values.withUnsafeMutableBufferPointer { g in
        up.values.withUnsafeBufferPointer { u in
            let pointers = UncheckedSendable((g.baseAddress!, u.baseAddress!))
            forEachBlock(g.count) { range in
                dl_sigmoid_weighted(path.cValue, pointers.value.0 + range.lowerBound, pointers.value.1 + range.lowerBound, range.count, 1)
            }
        }
    }
    return output
}

/// Runs `body` over `0..<count` in blocks of 16384 elements spread over the workers (one block
/// runs inline).
private func forEachBlock(_ count: Int, _ body: @Sendable (Range<Int>) -> Void) {
    let block = 16384, blocks = (count + block - 1) / block
    guard blocks > 1 else {
        if count > 0 { body(0..<count) }
        return
    }
    Parallelism.forEach(blocks) { b in body(b * block ..< min(count, (b + 1) * block)) }
}

/// Numerically stable softmax over `count` floats in place (`dl_softmax`: the same bits on every
/// path); `-infinity` entries get weight 0.
/// A row that is all `-infinity` becomes all zeros.
@inline(__always)
public func softmaxInPlace(_ row: UnsafeMutablePointer<Float>, count: Int, path: KernelPath = Kernels.path) {
    dl_softmax(path.cValue, row, count)
}

/// Natural-log softmax of `logits`.
public func logSoftmax(_ logits: [Float]) -> [Float] {
    var maximum = -Float.infinity
    for v in logits where v > maximum { maximum = v }
    var sum: Double = 0
    for v in logits { sum += Double(expf(v - maximum)) }
    let logSum = Float(log(sum)) + maximum
    return logits.map { $0 - logSum }
}

/// Rotary position embedding, LLaMA / GPT-NeoX style (`rotate_half`, not interleaved).
///
/// `inverseFrequencies[i] = 1 / theta^(2i / headDim)` computed in f32 as transformers does;
/// the angle of position `p` is `Float(p) * inverseFrequencies[i]`.
public struct RotaryEmbedding: Sendable {
    public let headDimension: Int
    public let inverseFrequencies: [Float]

    public init(headDimension: Int, theta: Float) {
        precondition(headDimension % 2 == 0, "RoPE needs an even head dimension")
        self.headDimension = headDimension
        inverseFrequencies = (0..<headDimension / 2).map { i in
            1 / powf(theta, Float(2 * i) / Float(headDimension))
        }
    }

    /// Rotates each of `heads` head vectors in every row of `x` `[T, heads * headDimension]`,
    /// row `t` by its own position `positions[t]`.
    public func apply(_ x: inout Matrix, heads: Int, positions: [Int32]) {
        precondition(x.columns == heads * headDimension && positions.count == x.rows, "RoPE: shape mismatch")
        let half = headDimension / 2
        var cosines = [Float](repeating: 0, count: half)
        var sines = [Float](repeating: 0, count: half)
        let columns = x.columns
        x.values.withUnsafeMutableBufferPointer { v in
            for t in 0..<x.rows {
                let position = Float(positions[t])
                for i in 0..<half {
                    let angle = position * inverseFrequencies[i]
                    cosines[i] = cosf(angle)
                    sines[i] = sinf(angle)
                }
                for h in 0..<heads {
                    let head = v.baseAddress! + t * columns + h * headDimension
                    for i in 0..<half {
                        let a = head[i], b = head[i + half]
                        head[i] = a * cosines[i] - b * sines[i]
                        head[i + half] = b * cosines[i] + a * sines[i]
                    }
                }
            }
        }
    }
}
