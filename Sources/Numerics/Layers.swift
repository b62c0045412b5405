/// A LayerNorm's parameters, `[features]` each.
public struct LayerNormWeights: Sendable {
    public let weight: [Float]
    public let bias: [Float]
    public let epsilon: Float

    public init(weight: [Float], bias: [Float], epsilon: Float) {
        precondition(weight.count == bias.count, "LayerNorm: weight and bias differ in size")
        self.weight = weight
        self.bias = bias
        self.epsilon = epsilon
    }

    /// Identity parameters (weight 1, bias 0).
    public init(features: Int, epsilon: Float) {
        self.init(weight: Array(repeating: 1, count: features), bias: Array(repeating: 0, count: features), epsilon: epsilon)
    }

    public func callAsFunction(_ x: Matrix) -> Matrix {
        layerNorm(x, weight: weight, bias: bias, epsilon: epsilon)
    }
}

/// A linear layer `y = x Wᵀ + b`; weight `[outFeatures, inFeatures]` kept in its stored dtype.
public struct LinearLayer: Sendable {
    public let weight: WeightMatrix
    public let bias: [Float]?

    public init(weight: WeightMatrix, bias: [Float]?) {
        self.weight = weight
        self.bias = bias
    }

    public func callAsFunction(_ x: Matrix) -> Matrix {
        linear(x, weight, bias: bias)
    }
}
