// `dllava generate` end to end, as a user or another tool runs it: a real process, JSON on stdout,
// one sentence on stderr and a sysexits code on failure.
import CommandLineSupport
import Foundation
import Testing
import Numerics
import SafeTensors

/// Copies a fixture model into a temporary directory so a test can damage it.
func copyOfFixtureModel(_ name: String) throws -> URL {
    let destination = FileManager.default.temporaryDirectory.appendingPathComponent("dllava-model-\(UUID().uuidString)")
    try FileManager.default.copyItem(at: fixtures.appendingPathComponent("models/\(name)"), to: destination)
    return destination
}

@Suite("dllava generate")
struct CommandLineTests {
    func arguments(model: String, case k: Int, extra: [String] = []) throws -> [String] {
        let c = try Fixture.cases()[k]
        return ["generate", "--model", model,
                "--token-ids-before", c.idsBeforeImage.map(String.init).joined(separator: ","),
                "--token-ids-after", c.idsAfterImage.map(String.init).joined(separator: ","),
                "--pixel-values", fixtures.appendingPathComponent("goldens/inputs.safetensors").path,
                "--pixel-tensor", "pixel_values_\(k)", "--max-tokens", "9", "--threads", "1", "--precision", "f32"] + extra
    }

    @Test("--json --logprobs 5 gives transformers' greedy ids and log-probabilities within 1e-4", arguments: Fixture.modelNames)
    func jsonMatchesTransformers(model name: String) throws {
        for k in 0..<2 {
            let run = try runDLLaVA(arguments(model: fixtures.appendingPathComponent("models/\(name)").path, case: k,
                                              extra: ["--json", "--logprobs", "5"]))
            #expect(run.status == 0, "\(run.standardError)")
            struct Output: Decodable {
                struct Entry: Decodable { let id: Int32; let logprob: Float }
                let token_ids: [Int32]
                let finish_reason: String
                let logprobs: [[Entry]]
                let stats: [String: JSONValue]
            }
            let output = try JSONDecoder().decode(Output.self, from: Data(run.standardOutput.utf8))
            let golden = try Fixture.goldens(name, case: k)
            let expectedIDs = try golden["greedy_ids"]!.integers().map(Int32.init)
            #expect(output.token_ids == expectedIDs)
            #expect(output.finish_reason == "length")
            let logits = try golden["step_logits"]!.floats()
            let vocabulary = logits.count / expectedIDs.count
            for step in 0..<expectedIDs.count {
                let reference = logSoftmax(Array(logits[step * vocabulary ..< (step + 1) * vocabulary]))
                #expect(output.logprobs[step].count == 5)
                #expect(output.logprobs[step][0].id == expectedIDs[step])
                for entry in output.logprobs[step] {
                    let expected = reference[Int(entry.id)]
                    #expect(abs(entry.logprob - expected) <= 1e-4 * max(1, abs(expected)), "step \(step) id \(entry.id)")
                }
            }
            for key in ["image_tokens_total", "image_tokens_kept", "kv_cells_per_layer", "prefill_ms", "decode_ms",
                        "prefill_flops", "decode_flops", "kv_bytes_peak", "load_ms"] {
                #expect(output.stats[key] != nil, "stats.\(key) missing")
            }
        }
    }

    /// The bf16 precision against the same transformers goldens (computed in f32): the recorded
    /// precision, and how far it strays. Measured on these fixtures: greedy ids identical, chosen
    /// tokens' log-probabilities within 0.03 (tiny random models: flat distributions).
    @Test("--precision bf16 is recorded in stats, keeps its K/V in bf16, keeps transformers' greedy ids and log-probabilities within 0.1",
          arguments: Fixture.modelNames)
    func bf16StaysNearTransformers(model name: String) throws {
        for k in 0..<2 {
            let run = try runDLLaVA(arguments(model: fixtures.appendingPathComponent("models/\(name)").path, case: k,
                                              extra: ["--json", "--logprobs", "1", "--precision", "bf16"]))
            guard Precision.bf16.isNative else {
                #expect(run.status == 64 && run.standardError.contains("AVX512-BF16"))
                return
            }
            #expect(run.status == 0, "\(run.standardError)")
            struct Output: Decodable {
                struct Entry: Decodable { let id: Int32; let logprob: Float }
                struct Stats: Decodable { let precision: String; let kv_bytes_peak: Int; let kv_cells_per_layer: [Int] }
                let token_ids: [Int32]
                let logprobs: [[Entry]]
                let stats: Stats
            }
            let output = try JSONDecoder().decode(Output.self, from: Data(run.standardOutput.utf8))
            #expect(output.stats.precision == "bf16")
            // Two bytes per K and V element: half the f32 footprint.
            let model = try Fixture.model(name).language.configuration
            let cells = output.stats.kv_cells_per_layer.reduce(0, +)
            #expect(cells > 0 && output.stats.kv_bytes_peak == cells * model.keyValueWidth * 2 * 2)
            let golden = try Fixture.goldens(name, case: k)
            let expectedIDs = try golden["greedy_ids"]!.integers().map(Int32.init)
            #expect(output.token_ids == expectedIDs)
            let logits = try golden["step_logits"]!.floats()
            let vocabulary = logits.count / expectedIDs.count
            for step in 0..<min(expectedIDs.count, output.logprobs.count) {
                let reference = logSoftmax(Array(logits[step * vocabulary ..< (step + 1) * vocabulary]))
                let entry = output.logprobs[step][0]
                #expect(abs(entry.logprob - reference[Int(entry.id)]) <= 0.1, "step \(step) id \(entry.id)")
            }
        }
    }

    @Test("every kernel path DLLAVA_KERNEL can force gives the same ids and log-probabilities; an unknown path exits 78")
    func kernelPathsAgreeThroughTheCommandLine() throws {
        let model = fixtures.appendingPathComponent("models/llava_orig_tiny").path
        var environment = ProcessInfo.processInfo.environment
        // Timings differ between runs; ids and log-probabilities must not.
        struct Output: Decodable, Equatable {
            struct Entry: Decodable, Equatable { let id: Int32; let logprob: Float }
            let token_ids: [Int32]
            let logprobs: [[Entry]]
        }
        var outputs: [KernelPath: Output] = [:]
        for path in KernelPath.allCases where path.isAvailable {
            environment["DLLAVA_KERNEL"] = path.rawValue
            let run = try runDLLaVA(arguments(model: model, case: 0, extra: ["--json", "--logprobs", "3"]), environment: environment)
            #expect(run.status == 0, "\(path): \(run.standardError)")
            outputs[path] = try JSONDecoder().decode(Output.self, from: Data(run.standardOutput.utf8))
        }
        let first = try #require(outputs[.scalar])
        for (path, output) in outputs { #expect(output == first, "\(path) differs from scalar") }
        environment["DLLAVA_KERNEL"] = "avx9000"
        let unknown = try runDLLaVA(arguments(model: model, case: 0), environment: environment)
        #expect(unknown.status == 78 && unknown.standardError.contains("DLLAVA_KERNEL=avx9000"))
    }

    @Test("a missing config.json exits 78 and names the file")
    func missingConfiguration() throws {
        let model = try copyOfFixtureModel("llava_orig_tiny")
        try FileManager.default.removeItem(at: model.appendingPathComponent("config.json"))
        let run = try runDLLaVA(arguments(model: model.path, case: 0))
        #expect(run.status == 78)
        #expect(run.standardError.contains(model.appendingPathComponent("config.json").path))
    }

    @Test("a truncated shard exits 65 and names the file and the tensor")
    func truncatedShard() throws {
        let model = try copyOfFixtureModel("llava_orig_tiny")
        let shard = model.appendingPathComponent("model-00002-of-00002.safetensors")
        let data = try Data(contentsOf: shard)
        try data.prefix(data.count - 1000).write(to: shard)
        let run = try runDLLaVA(arguments(model: model.path, case: 0))
        #expect(run.status == 65)
        #expect(run.standardError.contains(shard.path))
        #expect(run.standardError.contains("truncated"))
    }

    @Test("a model.safetensors of random bytes, or with a header length of 2^63+5, exits 65 from generate and quantize, naming the file",
          arguments: ["random bytes", "header length 2^63+5"])
    func malformedHeaderExits65(_ damage: String) throws {
        let model = try copyOfFixtureModel("dynamic_llava_tiny")
        defer { try? FileManager.default.removeItem(at: model) }
        let shard = model.appendingPathComponent("model.safetensors")
        var bytes: [UInt8]
        if damage == "random bytes" {
            var generator = SplitMix64(seed: 5)
            bytes = (0..<4096).map { _ in UInt8.random(in: 0...255, using: &generator) }
        } else {
            bytes = try Array(Data(contentsOf: shard))
            withUnsafeBytes(of: (UInt64(1) << 63 + 5).littleEndian) { bytes.replaceSubrange(0..<8, with: $0) }
        }
        try Data(bytes).write(to: shard)
        let output = model.deletingLastPathComponent().appendingPathComponent("dllava-q8-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: output) }
        for arguments in [["generate", "--model", model.path, "--token-ids-before", "1,2,3", "--max-tokens", "2"],
                          ["quantize", "--model", model.path, "--output", output.path]] {
            let run = try runDLLaVA(arguments)
            #expect(run.status == 65, "\(arguments[0]), \(damage): exit \(run.status), \(run.standardError)")
            #expect(run.standardError.contains(shard.path), "\(arguments[0]), \(damage): \(run.standardError)")
        }
    }

    @Test("a missing tensor or a wrong shape exits 78 and names the tensor")
    func missingTensorAndWrongShape() throws {
        let model = try copyOfFixtureModel("llava_orig_tiny")
        let config = model.appendingPathComponent("config.json")
        var object = try JSONSerialization.jsonObject(with: Data(contentsOf: config)) as! [String: Any]
        object["intermediate_size"] = 100
        try JSONSerialization.data(withJSONObject: object).write(to: config)
        let wrongShape = try runDLLaVA(arguments(model: model.path, case: 0))
        #expect(wrongShape.status == 78)
        #expect(wrongShape.standardError.contains("mlp.gate_proj.weight"))

        object["intermediate_size"] = 176
        object["num_hidden_layers"] = 4
        try JSONSerialization.data(withJSONObject: object).write(to: config)
        let missing = try runDLLaVA(arguments(model: model.path, case: 0))
        #expect(missing.status == 78)
        #expect(missing.standardError.contains("model.layers.3."))
    }

    @Test("a token id outside the vocabulary exits 65; a malformed id list exits 64")
    func badPromptIDs() throws {
        let model = fixtures.appendingPathComponent("models/llava_hf_tiny").path
        let outside = try runDLLaVA(["generate", "--model", model, "--token-ids-before", "1,5000"])
        #expect(outside.status == 65)
        #expect(outside.standardError.contains("5000"))
        let malformed = try runDLLaVA(["generate", "--model", model, "--token-ids-before", "1,x"])
        #expect(malformed.status == 64)
    }
}

/// Any JSON value (stats are checked for presence only).
enum JSONValue: Decodable {
    case number(Double), array([JSONValue]), other

    init(from decoder: Decoder) throws {
        let c = try decoder.singleValueContainer()
        if let n = try? c.decode(Double.self) { self = .number(n) }
        else if let a = try? c.decode([JSONValue].self) { self = .array(a) }
        else { self = .other }
    }
}

/// The sample images all test targets read in place (`Tests/Fixtures/images`).
let sampleImages = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
    .appendingPathComponent("../Fixtures/images").standardizedFileURL

@Suite("dllava generate --image --prompt and dllava tokenize")
struct PipelineCommandLineTests {
    let model = fixtures.appendingPathComponent("models/llava_orig_tiny").path

    @Test("an image and a question run through the whole pipeline and give JSON with text")
    func imageAndPrompt() throws {
        let run = try runDLLaVA(["generate", "--model", model, "--image", sampleImages.appendingPathComponent("horse.png").path,
                                 "--prompt", "Describe the image.", "--max-tokens", "5", "--json", "--threads", "1"])
        #expect(run.status == 0, "\(run.standardError)")
        let object = try JSONSerialization.jsonObject(with: Data(run.standardOutput.utf8)) as! [String: Any]
        #expect((object["token_ids"] as! [Int]).count == 5)
        #expect(object["text"] is String)
        let stats = object["stats"] as! [String: Any]
        // 576 image tokens plus the vicuna_v1 prompt around them.
        #expect(stats["image_tokens_total"] as? Int == 576)
        #expect((stats["prompt_tokens"] as! Int) > 576 + 60)
    }

    @Test("every bad_* sample image exits 65 with a sentence naming the file")
    func badImages() throws {
        let names = try FileManager.default.contentsOfDirectory(atPath: sampleImages.path).filter { $0.hasPrefix("bad_") }
        #expect(!names.isEmpty)
        for name in names {
            let path = sampleImages.appendingPathComponent(name).path
            let run = try runDLLaVA(["generate", "--model", model, "--image", path, "--prompt", "Describe the image."])
            #expect(run.status == 65, "\(name): \(run.standardError)")
            #expect(run.standardError.contains(path), "\(name): \(run.standardError)")
            #expect(run.standardOutput.isEmpty)
        }
    }

    @Test("a model directory without a tokenizer exits 78")
    func missingTokenizer() throws {
        let copy = try copyOfFixtureModel("llava_orig_tiny")
        try FileManager.default.removeItem(at: copy.appendingPathComponent("tokenizer.model"))
        let run = try runDLLaVA(["generate", "--model", copy.path, "--image", sampleImages.appendingPathComponent("horse.png").path,
                                 "--prompt", "Describe the image."])
        #expect(run.status == 78, "\(run.standardError)")
    }

    @Test("tokenize prints BOS then the pieces' ids; --prompt splits the vicuna_v1 prompt at the image")
    func tokenize() throws {
        let run = try runDLLaVA(["tokenize", "--model", model, "--text", "Describe the image.", "--json"])
        #expect(run.status == 0, "\(run.standardError)")
        let object = try JSONSerialization.jsonObject(with: Data(run.standardOutput.utf8)) as! [String: Any]
        let ids = object["ids"] as! [Int]
        #expect(ids.first == 1)
        #expect((object["pieces"] as! [String]).first == "<s>")
        let prompt = try runDLLaVA(["tokenize", "--model", model, "--text", "Describe the image.", "--prompt", "--json"])
        let split = try JSONSerialization.jsonObject(with: Data(prompt.standardOutput.utf8)) as! [String: [Int]]
        #expect(split["ids_before_image"]!.first == 1)
        #expect(!split["ids_after_image"]!.contains(1))
        // The question's pieces appear after the image, without BOS.
        let question = Array(ids.dropFirst())
        let after = split["ids_after_image"]!
        #expect(after.count > question.count)
    }
}
