import ArgumentParser
import DynamicLLaVA
import Foundation

extension QuantizationType: ExpressibleByArgument {}

struct Quantize: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Write an 8-bit copy of a model directory.",
        discussion: """
        --type q8 stores the LLM's and the vision tower's linear weights as q8_0 (int8 quants with \
        an f16 scale per block of 32, docs/CHECKPOINTS.md); embeddings, norms, biases, projector, \
        predictors and the LM head are copied as stored. The output is a complete model directory \
        (config.json records the quantization and keeps sparse_config) that generate and run load \
        like any other; it is loaded once after writing as a check.
        """)

    @Option(help: "The model directory to quantize (either checkpoint layout).")
    var model: String

    @Option(help: "The directory to write (must not exist, or be an empty folder; anything else there is refused with exit 64).")
    var output: String

    @Option(help: "The weight format: q8.")
    var type: QuantizationType = .q8

    func run() throws {
        try reportingFailures {
            try checkOutputDirectory(output, option: "--output")
            let outputURL = URL(fileURLWithPath: output)
            let summary = try ModelQuantizer.quantize(model: URL(fileURLWithPath: model), output: outputURL, type: type)
            _ = try LLaVAModel.load(directory: outputURL)
            print("quantized \(summary.quantizedTensors) tensors to \(type.rawValue), copied \(summary.copiedTensors); "
                  + String(format: "%.1f MB -> %.1f MB in %@", Double(summary.bytesBefore) / 1e6, Double(summary.bytesAfter) / 1e6, output))
        }
    }
}
