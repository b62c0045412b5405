import Numerics

// Loading the building-block layers from a checkpoint, shapes checked.

extension LayerNormWeights {
    /// `prefix + "weight"` and `prefix + "bias"`, `[features]` each.
    public init(_ checkpoint: Checkpoint, _ prefix: String, features: Int, epsilon: Float) throws(CheckpointError) {
        self.init(weight: try checkpoint.floats(prefix + "weight", shape: [features]),
                  bias: try checkpoint.floats(prefix + "bias", shape: [features]), epsilon: epsilon)
    }
}

extension LinearLayer {
    /// `prefix + "weight"` `[outFeatures, inFeatures]` and, with `bias`, `prefix + "bias"` `[outFeatures]`.
    public init(_ checkpoint: Checkpoint, _ prefix: String, inFeatures: Int, outFeatures: Int, bias hasBias: Bool) throws(CheckpointError) {
        self.init(weight: try checkpoint.weight(prefix + "weight", shape: [outFeatures, inFeatures]),
                  bias: hasBias ? try checkpoint.floats(prefix + "bias", shape: [outFeatures]) : nil)
    }

    /// A layer whose output width is read from the checkpoint (`[?, inFeatures]`), with a bias.
    public init(_ checkpoint: Checkpoint, _ prefix: String, inFeatures: Int) throws(CheckpointError) {
        let view = try checkpoint.tensor(prefix + "weight")
        guard view.shape.count == 2, view.shape[1] == inFeatures else {
            throw .wrongShape(file: view.file.path, tensor: prefix + "weight", expected: [view.shape.first ?? -1, inFeatures], found: view.shape)
        }
        try self.init(checkpoint, prefix, inFeatures: inFeatures, outFeatures: view.shape[0], bias: true)
    }
}
