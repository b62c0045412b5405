// What the loader reads from each checkpoint layout besides the weights.
import Foundation
import Testing
@testable import DynamicLLaVA

@Suite("Checkpoint loading")
struct LoadingTests {
    @Test("each layout is recognised, with its image preprocessing and end-of-sequence id")
    func layoutsAndPreprocessing() throws {
        let original = try Fixture.model("llava_orig_tiny")
        #expect(original.layout == .original)
        // image_aspect_ratio "pad": LLaVA-1.5 pads to a square before CLIP's processor.
        #expect(original.imagePreprocessing.padToSquare)
        #expect(original.language.configuration.keyValueHeads == 2)
        let hf = try Fixture.model("llava_hf_tiny")
        #expect(hf.layout == .llavaHF)
        // llava-hf's processor is a plain CLIPImageProcessor (no do_pad).
        #expect(!hf.imagePreprocessing.padToSquare)
        #expect(hf.imagePreprocessing.mean == [0.48145466, 0.4578275, 0.40821073])
        // llava-hf's config.json lists only non-default values: LLaMA's defaults fill the rest.
        #expect(hf.language.configuration.rmsNormEpsilon == 1e-5)
    }

    @Test("unknown config fields are ignored; an unsupported projector is a clear error")
    func configurationFields() throws {
        let model = try copyOfFixtureModel("llava_orig_tiny")
        let config = model.appendingPathComponent("config.json")
        var object = try JSONSerialization.jsonObject(with: Data(contentsOf: config)) as! [String: Any]
        object["maskclip_some_field"] = ["anything": [1, 2]]
        try JSONSerialization.data(withJSONObject: object).write(to: config)
        _ = try LLaVAModel.load(directory: model)

        object["mm_projector_type"] = "linear"
        try JSONSerialization.data(withJSONObject: object).write(to: config)
        do {
            _ = try LLaVAModel.load(directory: model)
            Issue.record("a linear projector was accepted")
        } catch {
            #expect(error.description.contains("mm_projector_type"))
            #expect(error.exitCode == 78)
        }
    }

    @Test("a hub name in mm_vision_tower resolves to a directory of that name beside the model")
    func visionTowerByHubName() throws {
        let parent = FileManager.default.temporaryDirectory.appendingPathComponent("dllava-hub-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: parent, withIntermediateDirectories: true)
        let model = parent.appendingPathComponent("llava")
        try FileManager.default.copyItem(at: fixtures.appendingPathComponent("models/llava_orig_tiny"), to: model)
        try FileManager.default.moveItem(at: model.appendingPathComponent("clip"), to: parent.appendingPathComponent("clip-vit-tiny-336"))
        let config = model.appendingPathComponent("config.json")
        var object = try JSONSerialization.jsonObject(with: Data(contentsOf: config)) as! [String: Any]
        object["mm_vision_tower"] = "openai/clip-vit-tiny-336"
        try JSONSerialization.data(withJSONObject: object).write(to: config)
        _ = try LLaVAModel.load(directory: model)

        try FileManager.default.removeItem(at: parent.appendingPathComponent("clip-vit-tiny-336"))
        #expect(throws: Error.self) { try LLaVAModel.load(directory: model) }
    }
}

@Suite("The shipped demo model")
struct DemoModelTests {
    @Test("Jobs/models/dllava-scenes loads with its predictors and captions a sample scene as the PyTorch reference does")
    func captionsASampleScene() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../../Jobs").standardizedFileURL
        let model = try LLaVAModel.load(directory: root.appendingPathComponent("models/dllava-scenes"))
        #expect(model.sparse?.configuration.sparseLayer == 2)
        #expect(model.vision.configuration.patchCount == 144)
        let pipeline = try LLaVAPipeline(model: model)
        let request = try pipeline.request(imageAt: root.appendingPathComponent("samples/test_000002.png"), question: "Describe the image.",
                                           parameters: GenerationParameters(maxTokens: 64))
        let result = try pipeline.generator.generate([request])[0]
        // scripts/train/eval_reference.py printed this caption for test scene 2000002 (its ground truth too).
        #expect(result.text == "There is one shape: a small blue triangle at the top right.")
        #expect(result.finishReason == .stop)
    }
}
