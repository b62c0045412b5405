// `dllava run` on the shipped model quantized by `dllava quantize`: a q8 directory is a model
// directory like any other, and batching keeps every caption what `generate` gives alone.
import CommandLineSupport
import Foundation
import Testing

@Suite("dllava run with a q8 model", .serialized)
struct QuantizedModelTests {
    @Test("the shipped model quantized runs through dllava run; each batched caption equals generate alone")
    func quantizedModelRunsThroughTheQueue() throws {
        let directory = try workspace(jobs: [("a", sample("test_000000.png"), "Describe the image."),
                                             ("b", sample("test_000003.png"), "How many shapes are there?"),
                                             ("c", sample("test_000001.png"), "Describe the image.")])
        defer { try? FileManager.default.removeItem(at: directory) }
        let quantize = try run(["quantize", "--model", model, "--output", "q8", "--type", "q8"], in: directory)
        #expect(quantize.status == 0, "\(quantize.standardError)")
        let quantized = directory.appendingPathComponent("q8").path
        let daemon = try run(["run", "--db", "q.sqlite", "--model", quantized, "--out", "out", "--until-empty", "--batch-size", "3"], in: directory)
        #expect(daemon.status == 0, "\(daemon.standardError)")
        let records = try export(directory)
        for (id, image, prompt) in [("a", "test_000000.png", "Describe the image."), ("b", "test_000003.png", "How many shapes are there?")] {
            #expect(records[id]?["state"] as? String == "succeeded", "\(id)")
            let alone = try run(["generate", "--model", quantized, "--image", sample(image), "--prompt", prompt, "--max-tokens", "48"], in: directory)
            #expect(alone.status == 0, "\(alone.standardError)")
            #expect(records[id]?["text"] as? String == alone.standardOutput.trimmingCharacters(in: .newlines), "\(id)")
        }
    }
}
