// Dynamic-LLaVA's efficiency on this machine: prefill time of full, dynamic and FastV
// in one run, decode speed and KV bytes after 128 and 512 generated tokens, and the step time of
// decoding without a KV cache after 256 tokens. Random weights; the output gate is calibrated to
// keep about half of the generated tokens (see `calibratedOutputPredictor`).
import ArgumentParser
import Dispatch
import DynamicLLaVA
import Foundation
import Llama
import Numerics
import Sparsification
import Vision

struct SparsityBenchmark: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sparsity",
        abstract: "Full vs Dynamic-LLaVA vs FastV: prefill, decode with KV cache, decode without.")

    @Option(help: "tiny, mid, bench-1.57b or llava-1.5-7b.")
    var preset = "mid"

    @Option(help: "Precision of the products (f32, bf16).")
    var precision = Precision.f32

    @Option(help: "Threads.")
    var threads = 2

    @Option(name: .customLong("text-tokens"), help: "Text tokens around the image (35 before, the rest after).")
    var textTokens = 40

    @Option(name: .customLong("decode-tokens"), help: "Generated-token counts at which decode is measured (0 to skip).")
    var decodeTokens = "128,512"

    @Option(name: .customLong("no-cache-tokens"), help: "Generated tokens before the timed no-cache step (0 to skip).")
    var noCacheTokens = 256

    func run() throws {
        AllocatorTuning.reuseFreedMemory()  // as `dllava run` and `generate` allocate
        guard let preset = Preset.all[preset] else { throw ValidationError("unknown preset \(preset)") }
        Parallelism.setThreads(threads)
        guard precision.isNative else { throw ValidationError("precision \(precision.rawValue) is not native on this CPU") }
        Kernels.use(precision)
        let c = preset.language
        print("# dllava-bench sparsity: \(preset.name), \(threads) threads, \(precision.rawValue), kernel path \(Kernels.path.rawValue)")
        let start = DispatchTime.now()
        let vision = CLIPVisionTower(randomWeights: preset.vision, selectLayer: -2, storageType: preset.storageType, seed: 1)
        let language = LlamaModel(randomWeights: c, storageType: preset.storageType, seed: 2)
        let projector = MultimodalProjector(
            linear1: LinearLayer(weight: WeightMatrix(randomRows: c.hiddenSize, columns: preset.vision.hiddenSize, storageType: preset.storageType, seed: 3), bias: nil),
            linear2: LinearLayer(weight: WeightMatrix(randomRows: c.hiddenSize, columns: c.hiddenSize, storageType: preset.storageType, seed: 4), bias: nil))
        var sparseConfiguration = SparseConfiguration()
        sparseConfiguration.sparseLayer = 2
        let imagePredictor = ImagePredictor(randomWeights: sparseConfiguration, hiddenSize: c.hiddenSize, seed: 5)
        let plain = LLaVAModel(vision: vision, projector: projector, language: language, directory: URL(fileURLWithPath: "/dev/null"),
                               layout: .original, endOfSequenceTokenID: nil, imagePreprocessing: ImagePreprocessing(padToSquare: true))
        let before = (0..<min(35, textTokens)).map { Int32(3 + ($0 * 37) % (c.vocabularySize - 3)) }
        let after = (0..<max(0, textTokens - 35)).map { Int32(3 + ($0 * 53) % (c.vocabularySize - 3)) }
        let pixels = (0..<3 * preset.vision.imageSize * preset.vision.imageSize).map { Float(($0 * 7919) % 255) / 127.5 - 1 }
        let counts = decodeTokens.split(separator: ",").compactMap { Int($0) }.filter { $0 > 0 }
        let prefix = (0..<noCacheTokens).map { Int32(3 + ($0 * 97) % (c.vocabularySize - 3)) }
        // Calibrate on the tokens the gate will see: the no-cache measurement's generated prefix
        // when only that is measured, else greedy output.
        let calibrationTokens = counts.isEmpty && !prefix.isEmpty ? prefix : try Generator(model: plain).generate([GenerationRequest(
            idsBeforeImage: before, pixelValues: pixels, idsAfterImage: after, parameters: GenerationParameters(maxTokens: 64))])[0].tokenIDs
        let outputPredictor = calibratedOutputPredictor(model: plain, before: before, pixels: pixels, after: after, gated: calibrationTokens)
        let model = LLaVAModel(vision: vision, projector: projector, language: language, directory: plain.directory, layout: .original,
                               endOfSequenceTokenID: nil, imagePreprocessing: plain.imagePreprocessing,
                               sparse: SparseModules(configuration: sparseConfiguration, imagePredictor: .success(imagePredictor),
                                                     outputTextPredictor: .success(outputPredictor)))
        print(String(format: "built random model and calibrated the output gate in %.1f s", seconds(since: start)))
        let generator = Generator(model: model)
        func request(_ mode: SparsityMode, maxTokens: Int, cache: Bool = true, prefix: [Int32] = []) -> GenerationRequest {
            GenerationRequest(idsBeforeImage: before, pixelValues: pixels, idsAfterImage: after,
                              parameters: GenerationParameters(maxTokens: maxTokens, sparsity: SparsityParameters(mode: mode, usesKeyValueCache: cache, fastVLayer: min(3, c.hiddenLayers - 1))),
                              generatedPrefix: prefix)
        }

        // Vision alone, to show the language-model share of prefill.
        let visionStart = DispatchTime.now()
        _ = model.imageEmbeddings([pixels])
        let visionMilliseconds = seconds(since: visionStart) * 1000

        print("")
        print("## Prefill (\(before.count) + 576 image + \(after.count) tokens; vision + projector \(String(format: "%.0f", visionMilliseconds)) ms included)")
        print("")
        print("| mode | image tokens kept | prefill ms | vs full | language-model ms | vs full |")
        print("|---|---|---|---|---|---|")
        var fullPrefill = 0.0
        for mode in [SparsityMode.full, .dynamic, .fastv] {
            let result = try generator.generate([request(mode, maxTokens: 1)])[0]
            let total = result.stats.prefillMilliseconds
            if mode == .full { fullPrefill = total }
            print(String(format: "| %@ | %d | %.0f | %.2f | %.0f | %.2f |", mode.rawValue, result.stats.imageTokensKept, total, total / fullPrefill,
                         total - visionMilliseconds, (total - visionMilliseconds) / (fullPrefill - visionMilliseconds)))
        }

        if !counts.isEmpty {
            print("")
            print("## Decoding with a KV cache (greedy; gate calibrated to keep about 50% of generated tokens)")
            print("")
            print("| mode | generated | decode tok/s | KV MiB (f32) | vs full | KV cells per layer (first, last) | generated tokens kept above the sparse layer |")
            print("|---|---|---|---|---|---|---|")
            for count in counts {
                var fullBytes = 0
                for mode in [SparsityMode.full, .dynamic] {
                    let result = try generator.generate([request(mode, maxTokens: count)])[0]
                    let cells = result.stats.kvCellsPerLayer
                    let bytes = cells.reduce(0, +) * c.keyValueWidth * 2 * 4
                    if mode == .full { fullBytes = bytes }
                    let promptAbove = result.stats.promptTokens - result.stats.imageTokensTotal + result.stats.imageTokensKept
                    let keptGenerated = (cells.last ?? 0) - promptAbove
                    print(String(format: "| %@ | %d | %.2f | %.1f | %.2f | %d, %d | %d of %d |", mode.rawValue, count,
                                 Double(count - 1) / (result.stats.decodeMilliseconds / 1000), Double(bytes) / 1048576,
                                 Double(bytes) / Double(fullBytes), cells.first ?? 0, cells.last ?? 0, keptGenerated, count - 1))
                }
            }
        }

        if noCacheTokens > 0 {
            print("")
            print("## Decoding without a KV cache: one step after \(noCacheTokens) generated tokens (the whole sequence recomputed)")
            print("")
            print("| mode | step ms | vs full | tokens in layers >= 2 |")
            print("|---|---|---|---|")
            var fullStep = 0.0
            for mode in [SparsityMode.full, .dynamic] {
                let result = try generator.generate([request(mode, maxTokens: noCacheTokens + 1, cache: false, prefix: prefix)])[0]
                let step = result.stats.prefillMilliseconds
                if mode == .full { fullStep = step }
                print(String(format: "| %@ | %.0f | %.2f | %d |", mode.rawValue, step, step / fullStep, result.stats.kvCellsPerLayer.last ?? 0))
            }
        }
    }

    /// A random output-text predictor whose keep logit is shifted by the median of
    /// `logit0 - logit1` over the `gated` tokens, read at the sparse layer's input after the
    /// prompt, so that it keeps about half of them (random weights alone keep all or none).
    func calibratedOutputPredictor(model: LLaVAModel, before: [Int32], pixels: [Float], after: [Int32], gated: [Int32]) -> OutputTextPredictor {
        let language = model.language, c = language.configuration
        let predictor = OutputTextPredictor(randomWeights: c.hiddenSize, seed: 6)
        var hidden = Matrix.concatenateRows([language.embed(before), model.imageEmbeddings([pixels])[0], language.embed(after), language.embed(gated)])
        let total = hidden.rows
        var cache = KeyValueCache(layers: c.hiddenLayers, sequences: 1, keyValueWidth: c.keyValueWidth,
                                  storage: KeyValueCache.storage(for: precision))
        var observation = ForwardObservation()
        language.forward(&hidden, batch: TokenBatch(positions: (0..<Int32(total)).map { $0 }, sequences: Array(repeating: 0, count: total)),
                         layers: 0..<2, cache: &cache, observation: &observation)
        let logits = predictor.logits(hidden.rows((total - gated.count)..<total))
        let margins = (0..<logits.rows).map { logits.values[2 * $0] - logits.values[2 * $0 + 1] }.sorted()
        return predictor.shiftingKeepLogit(by: -margins[margins.count / 2])
    }
}
