import Foundation
import Numerics

/// xoshiro256** seeded through SplitMix64: small, fast, and its whole state is four integers,
/// so a KV snapshot can store it and a resumed job draws the same numbers.
public struct Xoshiro256: RandomNumberGenerator, Sendable, Codable, Equatable {
    public var state: [UInt64]

    public init(seed: UInt64) {
        var seeder = SplitMix64(seed: seed)
        state = [seeder.next(), seeder.next(), seeder.next(), seeder.next()]
    }

    public mutating func next() -> UInt64 {
        let result = ((state[1] &* 5) << 7 | (state[1] &* 5) >> 57) &* 9
        let t = state[1] << 17
        state[2] ^= state[0]
        state[3] ^= state[1]
        state[1] ^= state[2]
        state[0] ^= state[3]
        state[2] ^= t
        state[3] = state[3] << 45 | state[3] >> 19
        return result
    }

    /// A uniform float in [0, 1) with 24 random bits.
    public mutating func nextUnitFloat() -> Float {
        Float(next() >> 40) * (1.0 / 16_777_216.0)
    }
}

/// How the next token is chosen from the logits.
public struct SamplingParameters: Sendable, Codable, Equatable {
    /// 0 means greedy (argmax; the lowest id wins a tie).
    public var temperature: Float = 0
    /// Keep only the `topK` most likely tokens (0 = all).
    public var topK: Int = 0
    /// Keep the smallest set of most likely tokens whose probability reaches `topP` (1 = all).
    public var topP: Float = 1
    /// Seed of the random stream; the same seed gives the same tokens.
    public var seed: UInt64 = 0

    public init(temperature: Float = 0, topK: Int = 0, topP: Float = 1, seed: UInt64 = 0) {
        self.temperature = temperature
        self.topK = topK
        self.topP = topP
        self.seed = seed
    }

    public var isGreedy: Bool { temperature <= 0 }
}

/// A request's sampler: its parameters and its random stream (per request, never shared).
public struct Sampler: Sendable, Codable, Equatable {
    public let parameters: SamplingParameters
    public var generator: Xoshiro256

    public init(_ parameters: SamplingParameters) {
        self.parameters = parameters
        generator = Xoshiro256(seed: parameters.seed)
    }

    /// Chooses a token from `logits` `[V]`. Order as transformers' warpers: temperature, top-k,
    /// top-p, then one draw from the renormalised distribution.
    public mutating func sample(_ logits: [Float]) -> Int32 {
        if parameters.isGreedy { return Int32(argmax(logits)) }
        let scaled = logits.map { $0 / parameters.temperature }
        var candidates = Array(scaled.indices).sorted { scaled[$0] > scaled[$1] || (scaled[$0] == scaled[$1] && $0 < $1) }
        if parameters.topK > 0 && parameters.topK < candidates.count { candidates.removeSubrange(parameters.topK...) }
        let maximum = scaled[candidates[0]]
        var probabilities = candidates.map { Double(expf(scaled[$0] - maximum)) }
        var total = probabilities.reduce(0, +)
        if parameters.topP < 1 {
            var cumulative = 0.0
            var keep = 0
            for p in probabilities {
                keep += 1
                cumulative += p / total
                if cumulative >= Double(parameters.topP) { break }
            }
            candidates.removeSubrange(keep...)
            probabilities.removeSubrange(keep...)
            total = probabilities.reduce(0, +)
        }
        let draw = Double(generator.nextUnitFloat()) * total
        var cumulative = 0.0
        for (i, p) in probabilities.enumerated() {
            cumulative += p
            if draw < cumulative { return Int32(candidates[i]) }
        }
        return Int32(candidates[candidates.count - 1])
    }
}

/// Index of the largest value; the first one wins a tie (as torch.argmax).
public func argmax(_ values: [Float]) -> Int {
    var best = 0
    for i in values.indices where values[i] > values[best] { best = i }
    return best
}

/// One entry of a top-K log-probability list.
public struct TokenLogprob: Sendable, Codable, Equatable {
    public var id: Int32
    public var logprob: Float

    public init(id: Int32, logprob: Float) {
        self.id = id
        self.logprob = logprob
    }
}

/// The `k` most likely tokens under the model's own distribution (log-softmax of the raw logits,
/// natural log), most likely first.
public func topLogprobs(_ logits: [Float], k: Int) -> [TokenLogprob] {
    guard k > 0 else { return [] }
    let logprobs = logSoftmax(logits)
    let order = Array(logprobs.indices).sorted { logprobs[$0] > logprobs[$1] || (logprobs[$0] == logprobs[$1] && $0 < $1) }
    return order.prefix(k).map { TokenLogprob(id: Int32($0), logprob: logprobs[$0]) }
}
