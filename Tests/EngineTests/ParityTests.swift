// Stage-by-stage parity with transformers on the tiny LLaVA-1.5 fixtures
// (Scripts/reference/make_llava_goldens.py; regenerate there if a golden changes).
import Foundation
import Testing
@testable import DynamicLLaVA
import Llama
import Numerics
import SafeTensors

let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("Fixtures")

/// ||a - b|| / ||b||.
func relativeError(_ a: [Float], _ b: [Float]) -> Double {
    precondition(a.count == b.count, "relativeError: \(a.count) vs \(b.count) values")
    var difference = 0.0, norm = 0.0
    for i in a.indices {
        difference += Double(a[i] - b[i]) * Double(a[i] - b[i])
        norm += Double(b[i]) * Double(b[i])
    }
    return (difference / max(norm, 1e-30)).squareRoot()
}

struct GoldenCase: Sendable {
    let idsBeforeImage: [Int32]
    let idsAfterImage: [Int32]
    let pixelValues: [Float]
}

enum Fixture {
    static let modelNames = ["llava_hf_tiny", "llava_orig_tiny"]

    static func model(_ name: String) throws -> LLaVAModel {
        try LLaVAModel.load(directory: fixtures.appendingPathComponent("models/\(name)"))
    }

    static func cases() throws -> [GoldenCase] {
        struct Inputs: Decodable {
            struct Case: Decodable { let ids_before_image: [Int32]; let ids_after_image: [Int32] }
            let cases: [Case]
        }
        let data = try Data(contentsOf: fixtures.appendingPathComponent("goldens/inputs.json"))
        let inputs = try JSONDecoder().decode(Inputs.self, from: data)
        let pixels = try SafeTensorsFile(path: fixtures.appendingPathComponent("goldens/inputs.safetensors").path)
        return try inputs.cases.enumerated().map { k, c in
            GoldenCase(idsBeforeImage: c.ids_before_image, idsAfterImage: c.ids_after_image,
                       pixelValues: try pixels.tensors["pixel_values_\(k)"]!.floats())
        }
    }

    static func goldens(_ model: String, case k: Int) throws -> [String: TensorView] {
        try SafeTensorsFile(path: fixtures.appendingPathComponent("goldens/\(model)/case\(k).safetensors").path).tensors
    }

    static func request(_ c: GoldenCase, maxTokens: Int = 9, logprobs: Int = 0) -> GenerationRequest {
        GenerationRequest(idsBeforeImage: c.idsBeforeImage, pixelValues: c.pixelValues, idsAfterImage: c.idsAfterImage,
                          parameters: GenerationParameters(maxTokens: maxTokens, logprobs: logprobs))
    }
}

let tolerance = 1e-4

@Suite("Parity with transformers, stage by stage")
struct ParityTests {
    @Test("vision features match CLIP hidden_states[-2] without CLS", arguments: Fixture.modelNames)
    func visionFeatures(model name: String) throws {
        let model = try Fixture.model(name)
        for (k, c) in try Fixture.cases().enumerated() {
            let golden = try Fixture.goldens(name, case: k)
            let features = model.vision.features(c.pixelValues)
            #expect(features.rows == 576)
            let error = relativeError(features.values, try golden["vision_features"]!.floats())
            #expect(error <= tolerance, "\(name) case \(k): vision features relative error \(error)")
        }
    }

    @Test("projector output matches mlp2x_gelu on the golden features", arguments: Fixture.modelNames)
    func projector(model name: String) throws {
        let model = try Fixture.model(name)
        let golden = try Fixture.goldens(name, case: 0)
        let features = Matrix(rows: 576, columns: model.vision.configuration.hiddenSize, values: try golden["vision_features"]!.floats())
        let error = relativeError(model.projector(features).values, try golden["projector_output"]!.floats())
        #expect(error <= tolerance, "\(name): projector relative error \(error)")
    }

    @Test("every decoder layer's output matches, fed the golden inputs_embeds", arguments: Fixture.modelNames)
    func decoderLayers(model name: String) throws {
        let model = try Fixture.model(name)
        let language = model.language
        for (k, c) in try Fixture.cases().enumerated() {
            let golden = try Fixture.goldens(name, case: k)
            let embeddings = try golden["inputs_embeds"]!.floats()
            let length = embeddings.count / language.configuration.hiddenSize
            #expect(length == c.idsBeforeImage.count + 576 + c.idsAfterImage.count)
            // Our splice of text and image embeddings gives the same inputs_embeds.
            let spliced = Matrix.concatenateRows([language.embed(c.idsBeforeImage), model.imageEmbeddings([c.pixelValues])[0],
                                                  language.embed(c.idsAfterImage)])
            let spliceError = relativeError(spliced.values, embeddings)
            #expect(spliceError <= tolerance, "\(name) case \(k): inputs_embeds relative error \(spliceError)")

            var hidden = Matrix(rows: length, columns: language.configuration.hiddenSize, values: embeddings)
            var cache = KeyValueCache(layers: language.layerCount, sequences: 1, keyValueWidth: language.configuration.keyValueWidth)
            var observation = ForwardObservation(hiddenLayers: Set(0..<language.layerCount))
            let batch = TokenBatch(positions: (0..<Int32(length)).map { $0 }, sequences: Array(repeating: 0, count: length))
            language.forward(&hidden, batch: batch, layers: 0..<language.layerCount, cache: &cache, observation: &observation)
            for l in 0..<language.layerCount {
                let error = relativeError(observation.hiddenAfterLayer[l]!.values, try golden["hidden_after_layer_\(l)"]!.floats())
                #expect(error <= tolerance, "\(name) case \(k): layer \(l) relative error \(error)")
            }
            let normed = language.finalNormed(hidden.rows((length - 1)..<length))
            let normError = relativeError(normed.values, try golden["final_norm_output_last"]!.floats())
            #expect(normError <= tolerance, "\(name) case \(k): final norm relative error \(normError)")
        }
    }

    @Test("prefill and 8 greedy decode steps: identical ids, logits within 1e-4", arguments: Fixture.modelNames)
    func greedyGeneration(model name: String) throws {
        var generator = Generator(model: try Fixture.model(name))
        generator.recordsLogits = true
        for (k, c) in try Fixture.cases().enumerated() {
            let golden = try Fixture.goldens(name, case: k)
            let result = try generator.generate([Fixture.request(c)])[0]
            let expectedIDs = try golden["greedy_ids"]!.integers().map(Int32.init)
            #expect(result.tokenIDs == expectedIDs, "\(name) case \(k)")
            let expectedLogits = try golden["step_logits"]!.floats()
            let vocabulary = expectedLogits.count / expectedIDs.count
            for step in 0..<expectedIDs.count {
                let error = relativeError(result.stepLogits[step], Array(expectedLogits[step * vocabulary ..< (step + 1) * vocabulary]))
                #expect(error <= tolerance, "\(name) case \(k): step \(step) logits relative error \(error)")
            }
        }
    }

    @Test("a batch of N gives each row what it gets alone", arguments: Fixture.modelNames)
    func batchOfNEqualsNBatchesOfOne(model name: String) throws {
        var generator = Generator(model: try Fixture.model(name))
        generator.recordsLogits = true
        let cases = try Fixture.cases()
        // Different lengths per row: rows finish at different steps.
        let requests = [Fixture.request(cases[0], maxTokens: 6, logprobs: 3), Fixture.request(cases[1], maxTokens: 9, logprobs: 3),
                        Fixture.request(cases[0], maxTokens: 9, logprobs: 3)]
        let batched = try generator.generate(requests)
        for (r, request) in requests.enumerated() {
            let alone = try generator.generate([request])[0]
            #expect(batched[r].tokenIDs == alone.tokenIDs, "row \(r)")
            #expect(batched[r].finishReason == alone.finishReason)
            #expect(batched[r].stats.kvCellsPerLayer == alone.stats.kvCellsPerLayer)
            // Bit-identical, not merely close: the products never mix rows of different requests.
            #expect(batched[r].stepLogits == alone.stepLogits, "row \(r): logits differ from the row run alone")
            #expect(batched[r].logprobs == alone.logprobs)
        }
    }
}
