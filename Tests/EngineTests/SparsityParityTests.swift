// Dynamic-LLaVA's sparsified inference against the PyTorch reference (checked against the
// authors' code): Scripts/reference/make_dynamic_goldens.py, README-dynamic.md.
import CommandLineSupport
import Foundation
import Testing
@testable import DynamicLLaVA
import Llama
import Numerics
import SafeTensors
import Sparsification

enum DynamicFixture {
    static func model() throws -> LLaVAModel {
        try LLaVAModel.load(directory: fixtures.appendingPathComponent("models/dynamic_llava_tiny"))
    }

    static func goldens(case k: Int) throws -> [String: TensorView] {
        try SafeTensorsFile(path: fixtures.appendingPathComponent("goldens/dynamic_llava_tiny/case\(k).safetensors").path).tensors
    }

    static func request(_ c: GoldenCase, mode: SparsityMode, maxTokens: Int, cache: Bool = true) -> GenerationRequest {
        var request = Fixture.request(c, maxTokens: maxTokens)
        request.parameters.sparsity = SparsityParameters(mode: mode, usesKeyValueCache: cache, fastVLayer: 2)
        return request
    }
}

func rows(_ values: [Float], width: Int) -> [[Float]] {
    stride(from: 0, to: values.count, by: width).map { Array(values[$0 ..< $0 + width]) }
}

@Suite("Dynamic-LLaVA parity")
struct SparsityParityTests {
    func generator() throws -> Generator {
        var generator = Generator(model: try DynamicFixture.model())
        generator.recordsLogits = true
        return generator
    }

    func expectLogits(_ actual: [[Float]], _ golden: TensorView, _ label: String) throws {
        let expected = rows(try golden.floats(), width: golden.shape[1])
        #expect(actual.count == expected.count, "\(label): \(actual.count) steps, expected \(expected.count)")
        for (step, (a, e)) in zip(actual, expected).enumerated() {
            let error = relativeError(a, e)
            #expect(error <= tolerance, "\(label) step \(step): relative error \(error)")
        }
    }

    @Test("sparse_config is read (unknown fields ignored) and the predictors load")
    func loadsSparseConfiguration() throws {
        let model = try DynamicFixture.model()
        let sparse = try #require(model.sparse)
        #expect(sparse.configuration.sparseLayer == 2 && sparse.configuration.visionKeepRate == 0.2)
        #expect(sparse.configuration.modelDimension == 32 && sparse.configuration.heads == 4)
        #expect(sparse.imagePredictor.error == nil && sparse.outputTextPredictor.error == nil)
    }

    @Test("image predictor logits and the kept top-115 image tokens", arguments: [0, 1])
    func imagePredictor(case k: Int) throws {
        let model = try DynamicFixture.model()
        let golden = try DynamicFixture.goldens(case: k)
        let c = try Fixture.cases()[k]
        let input = try golden["sparse_layer_input"]!.floats()
        let h = model.language.configuration.hiddenSize
        let image = Matrix(rows: input.count / h, columns: h, values: input).rows(c.idsBeforeImage.count ..< c.idsBeforeImage.count + 576)
        guard case .success(let predictor)? = model.sparse?.imagePredictor else { Issue.record("no predictor"); return }
        let logits = predictor.logits(image)
        let error = relativeError(logits.values, try golden["image_predictor_logits"]!.floats())
        #expect(error <= tolerance, "image predictor logits relative error \(error)")
        #expect(KeepRules.topImageTokens(logits: logits, k: 115) == (try golden["kept_image_indices"]!.integers()))
    }

    @Test("decoder layers below and above the sparse layer, fed the golden inputs and kept rows", arguments: [0, 1])
    func prunedLayers(case k: Int) throws {
        let language = try DynamicFixture.model().language
        let golden = try DynamicFixture.goldens(case: k)
        let h = language.configuration.hiddenSize
        let embeddings = try golden["inputs_embeds"]!.floats()
        let n = embeddings.count / h
        var hidden = Matrix(rows: n, columns: h, values: embeddings)
        var cache = KeyValueCache(layers: 4, sequences: 1, keyValueWidth: language.configuration.keyValueWidth)
        var observation = ForwardObservation(hiddenLayers: [0, 1, 2, 3])
        var batch = TokenBatch(positions: (0..<Int32(n)).map { $0 }, sequences: Array(repeating: 0, count: n))
        language.forward(&hidden, batch: batch, layers: 0..<2, cache: &cache, observation: &observation)
        let kept = try golden["dynamic_kept_positions"]!.integers()
        hidden = hidden.gatherRows(kept)
        batch = batch.selecting(kept)
        language.forward(&hidden, batch: batch, layers: 2..<4, cache: &cache, observation: &observation)
        for l in 0..<4 {
            let error = relativeError(observation.hiddenAfterLayer[l]!.values, try golden["dynamic_hidden_after_layer_\(l)"]!.floats())
            #expect(error <= tolerance, "layer \(l): relative error \(error)")
        }
        #expect(cache.cellCounts(sequence: 0) == [n, n, kept.count, kept.count])
    }

    @Test("dynamic with KV cache: logits, ids, gate logits and decisions, kept image tokens, KV cells", arguments: [0, 1])
    func dynamicWithCache(case k: Int) throws {
        let golden = try DynamicFixture.goldens(case: k)
        let result = try generator().generate([DynamicFixture.request(try Fixture.cases()[k], mode: .dynamic, maxTokens: 16)])[0]
        #expect(result.tokenIDs == (try golden["dynamic_greedy_ids"]!.integers()).map(Int32.init))
        try expectLogits(result.stepLogits, golden["dynamic_step_logits"]!, "dynamic")
        try expectLogits(result.gateLogits, golden["dynamic_gate_logits"]!, "gate")
        #expect(result.gateLogits.map { KeepRules.keepsOutputToken($0) ? 1 : 0 } == (try golden["dynamic_gate_keep"]!.integers()))
        #expect(result.keptImageIndices == (try golden["kept_image_indices"]!.integers()))
        #expect(result.stats.kvCellsPerLayer == (try golden["dynamic_kv_cells_per_layer"]!.integers()))
        #expect(result.stats.imageTokensKept == 115 && result.stats.imageTokensTotal == 576)
    }

    @Test("dynamic without KV cache: logits, ids and the generated tokens kept at every step", arguments: [0, 1])
    func dynamicWithoutCache(case k: Int) throws {
        let golden = try DynamicFixture.goldens(case: k)
        let result = try generator().generate([DynamicFixture.request(try Fixture.cases()[k], mode: .dynamic, maxTokens: 16, cache: false)])[0]
        #expect(result.tokenIDs == (try golden["nocache_greedy_ids"]!.integers()).map(Int32.init))
        try expectLogits(result.stepLogits, golden["nocache_step_logits"]!, "no-cache")
        let expectedKept = rows(try golden["nocache_kept_generated"]!.integers().map(Float.init), width: 16)
            .map { $0.filter { $0 >= 0 }.map { Int($0) } }
        #expect(result.keptGeneratedIndices == expectedKept)
    }

    @Test("FastV (K = 2, 144 kept) and full context on the same checkpoint", arguments: [0, 1])
    func baselines(case k: Int) throws {
        let golden = try DynamicFixture.goldens(case: k)
        let c = try Fixture.cases()[k]
        let fastV = try generator().generate([DynamicFixture.request(c, mode: .fastv, maxTokens: 8)])[0]
        #expect(fastV.keptImageIndices == (try golden["fastv_kept_image_indices"]!.integers()))
        #expect(fastV.tokenIDs == (try golden["fastv_greedy_ids"]!.integers()).map(Int32.init))
        try expectLogits(fastV.stepLogits, golden["fastv_step_logits"]!, "fastv")
        #expect(fastV.stats.kvCellsPerLayer == (try golden["fastv_kv_cells_per_layer"]!.integers()))
        let full = try generator().generate([DynamicFixture.request(c, mode: .full, maxTokens: 8)])[0]
        #expect(full.tokenIDs == (try golden["full_greedy_ids"]!.integers()).map(Int32.init))
        try expectLogits(full.stepLogits, golden["full_step_logits"]!, "full")
    }

    @Test("masking dropped tokens' keys (diagonal kept) equals physically removing them")
    func maskedAttentionEqualsRemoval() throws {
        let model = try DynamicFixture.model()
        let language = model.language, h = language.configuration.hiddenSize
        let golden = try DynamicFixture.goldens(case: 0)
        let ids = try golden["masked_training_input_ids"]!.integers()
        let keep = try golden["masked_training_keep_mask"]!.integers().map { $0 == 1 }
        let prompt = try golden["inputs_embeds"]!.floats()
        let n = prompt.count / h
        let generated = ids[n...].map { Int32($0) }
        let embeddings = Matrix.concatenateRows([Matrix(rows: n, columns: h, values: prompt), language.embed(Array(generated))])
        let total = embeddings.rows
        let positions = (0..<Int32(total)).map { $0 }
        let keptRows = (0..<total).filter { keep[$0] }

        // Masked: every token runs; in layers >= 2 a dropped token is seen by itself only.
        var masked = embeddings
        var cache = KeyValueCache(layers: 4, sequences: 1, keyValueWidth: language.configuration.keyValueWidth)
        var observation = ForwardObservation()
        language.forward(&masked, batch: TokenBatch(positions: positions, sequences: Array(repeating: 0, count: total)),
                         layers: 0..<2, cache: &cache, observation: &observation)
        language.forward(&masked, batch: TokenBatch(positions: positions, sequences: Array(repeating: 0, count: total), writesKeyValue: keep),
                         layers: 2..<4, cache: &cache, observation: &observation)
        let maskedLogits = language.logits(masked.gatherRows(keptRows))

        // Removed: the dropped tokens leave the sequence after layer 2's input.
        var removed = embeddings
        var removedCache = KeyValueCache(layers: 4, sequences: 1, keyValueWidth: language.configuration.keyValueWidth)
        var batch = TokenBatch(positions: positions, sequences: Array(repeating: 0, count: total))
        language.forward(&removed, batch: batch, layers: 0..<2, cache: &removedCache, observation: &observation)
        removed = removed.gatherRows(keptRows)
        batch = batch.selecting(keptRows)
        language.forward(&removed, batch: batch, layers: 2..<4, cache: &removedCache, observation: &observation)
        let removedLogits = language.logits(removed)

        let error = relativeError(maskedLogits.values, removedLogits.values)
        #expect(error <= 1e-5, "masked vs removed relative error \(error)")
        let goldenError = relativeError(maskedLogits.values, try golden["masked_training_logits_kept"]!.floats())
        #expect(goldenError <= tolerance, "masked vs PyTorch MaskedSoftmax relative error \(goldenError)")
        #expect(cache.cellCounts(sequence: 0)[2] == keptRows.count)
    }

    @Test("a batch of N equals N batches of 1 in every mode, rows with different prompts, caches and modes together")
    func batchInvarianceAcrossModes() throws {
        let generator = try generator()
        let cases = try Fixture.cases()
        let requests = [
            DynamicFixture.request(cases[0], mode: .dynamic, maxTokens: 12),
            DynamicFixture.request(cases[1], mode: .dynamic, maxTokens: 9),
            DynamicFixture.request(cases[1], mode: .dynamic, maxTokens: 7, cache: false),
            DynamicFixture.request(cases[0], mode: .fastv, maxTokens: 6),
            DynamicFixture.request(cases[0], mode: .random, maxTokens: 5),
            DynamicFixture.request(cases[1], mode: .full, maxTokens: 8),
        ]
        let batched = try generator.generate(requests)
        for (r, request) in requests.enumerated() {
            let alone = try generator.generate([request])[0]
            #expect(batched[r].tokenIDs == alone.tokenIDs, "row \(r) (\(request.parameters.sparsity.mode))")
            #expect(batched[r].stepLogits == alone.stepLogits, "row \(r): logits differ from the row alone")
            #expect(batched[r].gateLogits == alone.gateLogits)
            #expect(batched[r].stats.kvCellsPerLayer == alone.stats.kvCellsPerLayer)
            #expect(batched[r].keptImageIndices == alone.keptImageIndices)
            #expect(batched[r].stats.prefillFlops == alone.stats.prefillFlops, "row \(r): prefill FLOPs are counted per sequence")
        }
        // Rows really differ in cache length.
        #expect(Set(batched.map { $0.stats.kvCellsPerLayer }).count >= 4)
    }
}

@Suite("Sparsity modes: resumption, random baseline, command line")
struct SparsityModeTests {
    @Test("continuing after a generated prefix gives what the uninterrupted run gives", arguments: [true, false])
    func generatedPrefixContinuesExactly(cache: Bool) throws {
        var generator = Generator(model: try DynamicFixture.model())
        generator.recordsLogits = true
        let c = try Fixture.cases()[0]
        let whole = try generator.generate([DynamicFixture.request(c, mode: .dynamic, maxTokens: 10, cache: cache)])[0]
        var resumed = DynamicFixture.request(c, mode: .dynamic, maxTokens: 10, cache: cache)
        resumed.generatedPrefix = Array(whole.tokenIDs.prefix(4))
        let rest = try generator.generate([resumed])[0]
        #expect(rest.tokenIDs == whole.tokenIDs)
        #expect(rest.stepLogits == Array(whole.stepLogits.dropFirst(4)))
        #expect(rest.stats.kvCellsPerLayer == whole.stats.kvCellsPerLayer)
    }

    /// Generated tokens whose K/V entered layers >= l (the last sampled token is never fed).
    func keptOutputTokens(_ result: GenerationResult, sparseLayer l: Int) -> (kept: Int, fed: Int) {
        let promptCellsAbove = result.stats.promptTokens - (result.stats.imageTokensTotal - result.stats.imageTokensKept)
        return (result.stats.kvCellsPerLayer[l] - promptCellsAbove, result.stats.kvCellsPerLayer[0] - result.stats.promptTokens)
    }

    @Test("output-token baselines: every-other keeps the 1st, 3rd, ... token; random keeps a seeded share; a batch equals its rows alone")
    func outputTokenBaselines() throws {
        var generator = Generator(model: try DynamicFixture.model())
        generator.recordsLogits = true
        let cases = try Fixture.cases()
        func request(_ k: Int, _ rule: OutputTokenRule, rate: Double? = nil, seed: UInt64 = 0, maxTokens: Int = 16) -> GenerationRequest {
            var request = DynamicFixture.request(cases[k], mode: .dynamic, maxTokens: maxTokens)
            request.parameters.endOfSequence = nil
            request.parameters.sparsity.outputTokens = rule
            request.parameters.sparsity.outputKeepRate = rate
            request.parameters.sampling.seed = seed
            return request
        }
        let l = 2
        let everyOther = try generator.generate([request(0, .everyOther)])[0]
        let (kept, fed) = keptOutputTokens(everyOther, sparseLayer: l)
        #expect(fed == 15 && kept == 8)
        #expect(everyOther.stats.kvCellsPerLayer[0 ..< l].allSatisfy { $0 == everyOther.stats.kvCellsPerLayer[0] })
        #expect(everyOther.gateLogits.count == 15, "the gate is still read and reported")

        let none = try generator.generate([request(0, .random, rate: 0)])[0]
        let all = try generator.generate([request(0, .random, rate: 1)])[0]
        #expect(keptOutputTokens(none, sparseLayer: l).kept == 0)
        #expect(keptOutputTokens(all, sparseLayer: l).kept == 15)

        // The random rule is a function of the seed and the position: over many positions it
        // keeps the requested share, the same seed decides the same, another seed differently.
        let decisions = { (seed: UInt64) in (0 ..< 4000).map { KeepRules.randomOutputToken(seed: seed, position: Int32($0), keepRate: 0.3) } }
        let share = Double(decisions(7).filter { $0 }.count) / 4000
        #expect(abs(share - 0.3) < 0.03, "kept share \(share)")
        #expect(decisions(7) == decisions(7) && decisions(7) != decisions(8))

        let requests = [request(0, .random, rate: 0.5, seed: 3), request(1, .everyOther, maxTokens: 9), request(1, .learned, maxTokens: 11),
                        request(0, .random, rate: 0.5, seed: 4, maxTokens: 7)]
        let batched = try generator.generate(requests)
        for (r, request) in requests.enumerated() {
            let alone = try generator.generate([request])[0]
            #expect(batched[r].tokenIDs == alone.tokenIDs && batched[r].stepLogits == alone.stepLogits, "row \(r)")
            #expect(batched[r].stats.kvCellsPerLayer == alone.stats.kvCellsPerLayer, "row \(r)")
        }
    }

    @Test("an output-token baseline outside dynamic mode with a KV cache is refused before any work")
    func outputTokenBaselineNeedsDynamicWithCache() throws {
        let generator = Generator(model: try DynamicFixture.model())
        let c = try Fixture.cases()[0]
        for (mode, cache) in [(SparsityMode.full, true), (.random, true), (.dynamic, false)] {
            var request = DynamicFixture.request(c, mode: mode, maxTokens: 4, cache: cache)
            request.parameters.sparsity.outputTokens = .everyOther
            #expect(throws: GenerationError.self) { try generator.generate([request]) }
        }
    }

    @Test("random dropping keeps k seeded image tokens: the same seed the same set, another seed another")
    func randomBaselineIsSeeded() throws {
        let generator = Generator(model: try DynamicFixture.model())
        let c = try Fixture.cases()[1]
        func kept(seed: UInt64) throws -> [Int] {
            var request = DynamicFixture.request(c, mode: .random, maxTokens: 1)
            request.parameters.sampling.seed = seed
            return try #require(try generator.generate([request])[0].keptImageIndices)
        }
        let first = try kept(seed: 1)
        #expect(first.count == 115 && first == first.sorted() && Set(first).count == 115)
        #expect(try kept(seed: 1) == first)
        #expect(try kept(seed: 2) != first)
    }

    @Test("--sparsity dynamic reports kept image tokens and per-layer KV cells; a plain model refuses it with 78")
    func commandLine() throws {
        let model = fixtures.appendingPathComponent("models/dynamic_llava_tiny").path
        let c = try Fixture.cases()[0]
        let arguments = ["generate", "--model", model,
                         "--token-ids-before", c.idsBeforeImage.map(String.init).joined(separator: ","),
                         "--token-ids-after", c.idsAfterImage.map(String.init).joined(separator: ","),
                         "--pixel-values", fixtures.appendingPathComponent("goldens/inputs.safetensors").path,
                         "--pixel-tensor", "pixel_values_0", "--max-tokens", "16", "--json", "--precision", "f32"]
        let run = try runDLLaVA(arguments + ["--sparsity", "dynamic"])
        #expect(run.status == 0, "\(run.standardError)")
        let object = try JSONSerialization.jsonObject(with: Data(run.standardOutput.utf8)) as! [String: Any]
        let stats = object["stats"] as! [String: Any]
        let golden = try DynamicFixture.goldens(case: 0)
        #expect(stats["image_tokens_kept"] as? Int == 115)
        #expect(stats["kv_cells_per_layer"] as? [Int] == (try golden["dynamic_kv_cells_per_layer"]!.integers()))
        #expect(object["token_ids"] as? [Int] == (try golden["dynamic_greedy_ids"]!.integers()))

        let noCache = try runDLLaVA(arguments + ["--sparsity", "dynamic", "--no-kv-cache"])
        let noCacheObject = try JSONSerialization.jsonObject(with: Data(noCache.standardOutput.utf8)) as! [String: Any]
        #expect(noCacheObject["token_ids"] as? [Int] == (try golden["nocache_greedy_ids"]!.integers()))

        let plain = try runDLLaVA(["generate", "--model", fixtures.appendingPathComponent("models/llava_orig_tiny").path,
                                   "--token-ids-before", "1,5", "--sparsity", "dynamic"])
        #expect(plain.status == 78)
        #expect(plain.standardError.contains("sparse_config"))
    }
}
