import Foundation

/// Plain, double-precision versions of every kernel, written for clarity, not speed.
/// The fast kernels are tested against these; nothing in the engine calls them.
public enum ReferenceKernels {
    /// `x · Wᵀ + bias` with a triple loop in Double.
    public static func linear(_ x: Matrix, _ weight: [Float], outFeatures: Int, bias: [Float]? = nil) -> Matrix {
        let k = x.columns
        var out = [Float](repeating: 0, count: x.rows * outFeatures)
        for r in 0..<x.rows {
            for o in 0..<outFeatures {
                var sum = Double(bias?[o] ?? 0)
                for i in 0..<k { sum += Double(x.values[r * k + i]) * Double(weight[o * k + i]) }
                out[r * outFeatures + o] = Float(sum)
            }
        }
        return Matrix(rows: x.rows, columns: outFeatures, values: out)
    }

    /// `x · Wᵀ` in f32 with the native kernels' summation order, written plainly: the twin every
    /// kernel path must equal bit for bit. Each element is one chain of fused multiply-adds in
    /// increasing `k` from +0 (the order of `dl_gemm_panels`).
    public static func linearInKernelOrder(_ x: Matrix, _ weight: WeightMatrix) -> Matrix {
        let k = x.columns, n = weight.rows
        var out = [Float](repeating: 0, count: x.rows * n)
        for o in 0..<n {
            let w = weight.widenedRows(o..<o + 1)
            for r in 0..<x.rows {
                var sum: Float = 0
                for i in 0..<k { sum = sum.addingProduct(x.values[r * k + i], w[i]) }
                out[r * n + o] = sum
            }
        }
        return Matrix(rows: x.rows, columns: n, values: out)
    }

    /// Dot products of `x`'s rows with the rows of a row-major `weight` in the order of `dl_gemm`
    /// (attention's scores for one query): lane `j` of 16 accumulates `k = j, j + 16, ...` with
    /// fused multiply-adds from +0, then lanes are added as `s8[i] = l[i] + l[i + 8]`,
    /// `s4[i] = s8[i] + s8[i + 4]`, `(s4[0] + s4[2]) + (s4[1] + s4[3])`.
    public static func dotProductsInLaneOrder(_ x: Matrix, _ weight: WeightMatrix) -> Matrix {
        let k = x.columns, n = weight.rows
        var out = [Float](repeating: 0, count: x.rows * n)
        for o in 0..<n {
            let w = weight.widenedRows(o..<o + 1)
            for r in 0..<x.rows {
                var lanes = [Float](repeating: 0, count: 16)
                for i in 0..<k { lanes[i % 16] = lanes[i % 16].addingProduct(x.values[r * k + i], w[i]) }
                let s8 = (0..<8).map { lanes[$0] + lanes[$0 + 8] }
                let s4 = (0..<4).map { s8[$0] + s8[$0 + 4] }
                out[r * n + o] = (s4[0] + s4[2]) + (s4[1] + s4[3])
            }
        }
        return Matrix(rows: x.rows, columns: n, values: out)
    }

    /// The bf16 precision's product written plainly: `x` and the weight rounded to bf16 (nearest
    /// even), then one chain per element over the pairs `k = 2t, 2t + 1` in increasing `t` from
    /// +0, the odd product added before the even one, each a fused multiply-add whose bf16
    /// subnormal inputs count as zero and whose subnormal result is flushed to zero (the
    /// definition of `vdpbf16ps`; the order of `dl_gemm_bf16_panels`).
    public static func linearBF16InKernelOrder(_ x: Matrix, _ weight: WeightMatrix) -> Matrix {
        let k = x.columns, n = weight.rows
        func flushed(_ v: Float) -> Float {
            v.bitPattern & 0x7F80_0000 == 0 ? Float(bitPattern: v.bitPattern & 0x8000_0000) : v
        }
        // Weights are rounded as `vcvtne2ps2bf16` does (an f32 subnormal first read as zero),
        // activations as `dl_narrow_bf16`; both then read as `vdpbf16ps` reads them.
        func rounded(_ values: [Float], zeroingSubnormals: Bool) -> [Float] {
            values.map { value in
                let v = zeroingSubnormals ? flushed(value) : value
                let bits = v.bitPattern
                if v.isNaN { return Float(bitPattern: (bits | 0x0040_0000) & 0xFFFF_0000) }
                var result = (bits &+ 0x7FFF &+ ((bits >> 16) & 1)) & 0xFFFF_0000
                if result & 0x7F80_0000 == 0 { result &= 0x8000_0000 }
                return Float(bitPattern: result)
            }
        }
        let input = rounded(x.values, zeroingSubnormals: false)
        var out = [Float](repeating: 0, count: x.rows * n)
        for o in 0..<n {
            let w = rounded(weight.widenedRows(o..<o + 1), zeroingSubnormals: true)
            for r in 0..<x.rows {
                var sum: Float = 0
                for i in stride(from: 0, to: k, by: 2) {
                    // An odd K's last pair: a zero activation and a zero weight.
                    sum = flushed(sum.addingProduct(i + 1 < k ? input[r * k + i + 1] : 0, i + 1 < k ? w[i + 1] : 0))
                    sum = flushed(sum.addingProduct(input[r * k + i], w[i]))
                }
                out[r * n + o] = sum
            }
        }
        return Matrix(rows: x.rows, columns: n, values: out)
    }

    /// The 8-bit product written plainly, the twin of `dl_gemm_q8`. Each row of `x` is quantized
    /// per block of 32: scale `d = amax / 127`, quants `round-to-nearest-even(x · (127 / amax))`
    /// clamped to ±127 (a block below 2^-100 is zero with `d = 0`; one holding NaN or infinity is
    /// zero with `d = NaN`). Per block `b` and group `j` of 4, the integer sum `P` of the 4
    /// products is exact; with `s = d_x · d_w` (f32), lane `(b mod 2) · 8 + j` of 16 adds
    /// `P · s` as a fused multiply-add, in increasing `b`, from +0; lanes are reduced as in
    /// `dotProductsInLaneOrder`.
    public static func linearQ8InKernelOrder(_ x: Matrix, _ weight: WeightMatrix) -> Matrix {
        precondition(weight.storageType == .q8, "linearQ8InKernelOrder: the weight is \(weight.storageType), not q8")
        let k = x.columns, n = weight.rows, size = Q8Layout.blockSize, blocks = Q8Layout.blocks(columns: k)
        let quants = weight.base.assumingMemoryBound(to: Int8.self)
        let weightScales = weight.scales!.assumingMemoryBound(to: UInt16.self)
        func halfToFloat(_ bits: UInt16) -> Float { Float(Float16(bitPattern: bits)) }

        // Activations: per row, padded quants `[blocks * 32]` and a scale per block.
        var inputQuants = [Int32](repeating: 0, count: x.rows * blocks * size)
        var inputScales = [Float](repeating: 0, count: x.rows * blocks)
        for r in 0..<x.rows {
            for b in 0..<blocks {
                let values = (b * size ..< min(k, (b + 1) * size)).map { x.values[r * k + $0] }
                let amax = values.reduce(Float(0)) { Swift.max($0, $1.magnitude) }
                if values.contains(where: { !$0.isFinite }) {
                    inputScales[r * blocks + b] = .nan
                } else if amax >= 0x1p-100 {
                    inputScales[r * blocks + b] = amax / 127
                    let inverse = 127 / amax
                    for (offset, value) in values.enumerated() {
                        let q = (value * inverse).rounded(.toNearestOrEven)
                        inputQuants[(r * blocks + b) * size + offset] = Int32(Swift.min(127, Swift.max(-127, q)))
                    }
                }
            }
        }

        var out = [Float](repeating: 0, count: x.rows * n)
        for o in 0..<n {
            for r in 0..<x.rows {
                var lanes = [Float](repeating: 0, count: 16)
                for b in 0..<blocks {
                    let s = inputScales[r * blocks + b] * halfToFloat(weightScales[o * blocks + b])
                    for j in 0..<8 {
                        var sum: Int32 = 0
                        for t in 0..<4 {
                            let i = b * size + 4 * j + t
                            sum += inputQuants[r * blocks * size + i] * Int32(quants[o * blocks * size + i])
                        }
                        lanes[(b % 2) * 8 + j] = lanes[(b % 2) * 8 + j].addingProduct(Float(sum), s)
                    }
                }
                let s8 = (0..<8).map { lanes[$0] + lanes[$0 + 8] }
                let s4 = (0..<4).map { s8[$0] + s8[$0 + 4] }
                out[r * n + o] = (s4[0] + s4[2]) + (s4[1] + s4[3])
            }
        }
        return Matrix(rows: x.rows, columns: n, values: out)
    }

    public static func rmsNorm(_ x: Matrix, weight: [Float], epsilon: Float) -> Matrix {
        var out = x.values
        for r in 0..<x.rows {
            let row = (0..<x.columns).map { Double(x.values[r * x.columns + $0]) }
            let meanSquare = row.reduce(0) { $0 + $1 * $1 } / Double(x.columns)
            let scale = 1 / (meanSquare + Double(epsilon)).squareRoot()
            for c in 0..<x.columns { out[r * x.columns + c] = Float(row[c] * scale * Double(weight[c])) }
        }
        return Matrix(rows: x.rows, columns: x.columns, values: out)
    }

    public static func layerNorm(_ x: Matrix, weight: [Float], bias: [Float], epsilon: Float) -> Matrix {
        var out = x.values
        for r in 0..<x.rows {
            let row = (0..<x.columns).map { Double(x.values[r * x.columns + $0]) }
            let mean = row.reduce(0, +) / Double(x.columns)
            let variance = row.reduce(0) { $0 + ($1 - mean) * ($1 - mean) } / Double(x.columns)
            for c in 0..<x.columns {
                out[r * x.columns + c] = Float((row[c] - mean) / (variance + Double(epsilon)).squareRoot() * Double(weight[c]) + Double(bias[c]))
            }
        }
        return Matrix(rows: x.rows, columns: x.columns, values: out)
    }

    public static func activation(_ x: Float, _ kind: Activation) -> Float {
        let v = Double(x)
        switch kind {
        case .gelu: return Float(0.5 * v * (1 + erf(v / 2.0.squareRoot())))
        case .quickGELU: return Float(v / (1 + exp(-1.702 * v)))
        case .silu: return Float(v / (1 + exp(-v)))
        }
    }

    public static func softmax(_ row: [Float]) -> [Float] {
        let maximum = row.max() ?? 0
        if maximum == -Float.infinity { return row.map { _ in 0 } }
        let exps = row.map { exp(Double($0) - Double(maximum)) }
        let sum = exps.reduce(0, +)
        return exps.map { Float($0 / sum) }
    }

    /// RoPE with angles in Double and the `rotate_half` pairing `(i, i + d/2)`.
    public static func rope(_ x: Matrix, heads: Int, headDimension: Int, positions: [Int32], theta: Double) -> Matrix {
        var out = x.values
        let half = headDimension / 2
        for t in 0..<x.rows {
            for h in 0..<heads {
                for i in 0..<half {
                    let angle = Double(positions[t]) / pow(theta, Double(2 * i) / Double(headDimension))
                    let base = t * x.columns + h * headDimension
                    let a = Double(x.values[base + i]), b = Double(x.values[base + i + half])
                    out[base + i] = Float(a * cos(angle) - b * sin(angle))
                    out[base + i + half] = Float(b * cos(angle) + a * sin(angle))
                }
            }
        }
        return Matrix(rows: x.rows, columns: x.columns, values: out)
    }
}
