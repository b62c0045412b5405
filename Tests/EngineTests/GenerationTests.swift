// Sampling and stopping rules of the generator, on the tiny fixture model.
import Foundation
import Testing
@testable import DynamicLLaVA
import Numerics

@Suite("Sampling and stopping")
struct GenerationTests {
    @Test("the same seed gives the same tokens; another seed gives others")
    func seededSamplingIsReproducible() throws {
        let generator = Generator(model: try Fixture.model("llava_hf_tiny"))
        let c = try Fixture.cases()[0]
        func run(seed: UInt64) throws -> [Int32] {
            var request = Fixture.request(c, maxTokens: 12)
            request.parameters.sampling = SamplingParameters(temperature: 1.5, topK: 50, topP: 0.95, seed: seed)
            return try generator.generate([request])[0].tokenIDs
        }
        let first = try run(seed: 7)
        #expect(try run(seed: 7) == first)
        #expect(try run(seed: 8) != first)
    }

    @Test("top-k 1 and a tiny top-p both reduce sampling to greedy")
    func degenerateSamplingIsGreedy() throws {
        let generator = Generator(model: try Fixture.model("llava_orig_tiny"))
        let c = try Fixture.cases()[1]
        let greedy = try generator.generate([Fixture.request(c)])[0].tokenIDs
        for sampling in [SamplingParameters(temperature: 1, topK: 1, seed: 3), SamplingParameters(temperature: 1, topP: 1e-6, seed: 3)] {
            var request = Fixture.request(c)
            request.parameters.sampling = sampling
            #expect(try generator.generate([request])[0].tokenIDs == greedy)
        }
    }

    @Test("sampled frequencies follow the softmax of logits / temperature")
    func samplerFollowsTheDistribution() {
        let logits: [Float] = [2, 1, 0, -1]
        var sampler = Sampler(SamplingParameters(temperature: 2, seed: 11))
        var counts = [Int](repeating: 0, count: 4)
        let draws = 20000
        for _ in 0..<draws { counts[Int(sampler.sample(logits))] += 1 }
        let expected = ReferenceKernels.softmax(logits.map { $0 / 2 })
        for i in 0..<4 {
            #expect(abs(Double(counts[i]) / Double(draws) - Double(expected[i])) < 0.015, "token \(i)")
        }
        // top-p 0.5 keeps only the most likely token here (p0 = 0.41 < 0.5 keeps two).
        var nucleus = Sampler(SamplingParameters(temperature: 2, topP: 0.5, seed: 11))
        let kept = Set((0..<2000).map { _ in nucleus.sample(logits) })
        #expect(kept == [0, 1])
    }

    @Test("generation stops after the end-of-sequence token, which is kept in token_ids but not in the text")
    func endOfSequenceStops() throws {
        var generator = Generator(model: try Fixture.model("llava_orig_tiny"), detokenize: { $0.map { "<\($0)>" }.joined() })
        generator.recordsLogits = false
        let c = try Fixture.cases()[0]
        let greedy = try generator.generate([Fixture.request(c)])[0].tokenIDs
        var request = Fixture.request(c)
        request.parameters.endOfSequence = greedy[2]
        let result = try generator.generate([request])[0]
        #expect(result.tokenIDs == Array(greedy.prefix(3)))
        #expect(result.finishReason == .stop)
        #expect(result.text == greedy.prefix(2).map { "<\($0)>" }.joined())
    }

    @Test("a stop string ends generation and cuts the text before it")
    func stopStringsCutTheText() throws {
        let generator = Generator(model: try Fixture.model("llava_orig_tiny"), detokenize: { $0.map { "<\($0)>" }.joined() })
        let c = try Fixture.cases()[0]
        let greedy = try generator.generate([Fixture.request(c)])[0].tokenIDs
        var request = Fixture.request(c)
        request.parameters.stop = ["<\(greedy[3])>", "never"]
        let result = try generator.generate([request])[0]
        #expect(result.finishReason == .stop)
        #expect(result.tokenIDs == Array(greedy.prefix(4)))
        #expect(result.text == greedy.prefix(3).map { "<\($0)>" }.joined())
        // max tokens: length.
        let short = try generator.generate([Fixture.request(c, maxTokens: 2)])[0]
        #expect(short.finishReason == .length && short.tokenIDs.count == 2)
    }

    @Test("a prompt longer than the context is rejected before any work")
    func promptLongerThanContext() throws {
        let generator = Generator(model: try Fixture.model("llava_orig_tiny"))
        let request = GenerationRequest(idsBeforeImage: Array(repeating: 5, count: 2100), pixelValues: nil, idsAfterImage: [],
                                        parameters: GenerationParameters())
        #expect(throws: GenerationError.promptTooLong(request: 0, tokens: 2100, context: 2048)) {
            try generator.generate([request])
        }
    }

    @Test("KV cells per layer count the prompt plus every generated token but the last")
    func cacheAccounting() throws {
        let generator = Generator(model: try Fixture.model("llava_hf_tiny"))
        let c = try Fixture.cases()[1]
        let result = try generator.generate([Fixture.request(c, maxTokens: 5)])[0]
        let prompt = c.idsBeforeImage.count + 576 + c.idsAfterImage.count
        #expect(result.stats.kvCellsPerLayer == Array(repeating: prompt + 4, count: 3))
        #expect(result.stats.kvBytesPeak == (prompt + 4) * 3 * 64 * 2 * 4)
        #expect(result.stats.imageTokensKept == 576 && result.stats.promptTokens == prompt)
    }
}
