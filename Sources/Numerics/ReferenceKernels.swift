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
