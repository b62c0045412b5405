import ArgumentParser
import Artifacts
import DynamicLLaVA
import Foundation
import Imaging
import Numerics
import SafeTensors

/// Options every model-running command shares.
struct ModelOptions: ParsableArguments {
    @Option(help: "Model directory (either checkpoint layout). Defaults to $DLLAVA_MODEL, else the model Scripts/install installed.")
    var model: String?

    @Option(help: "Worker threads for matrix products (default: all cores). Results do not depend on it.")
    var threads: Int = ProcessInfo.processInfo.activeProcessorCount

    @Option(help: """
        Arithmetic of the matrix products: f32, or bf16 (activations and weights rounded to bf16, \
        sums in f32; needs AVX512-BF16 or AMX-BF16). Default: bf16 where bf16 products are the faster \
        (AMX-BF16; AVX512-BF16 on AMD), else f32; `dllava doctor` says which and why. Results do not depend on \
        the thread count or batch in either.
        """)
    var precision: Precision?

    /// The precision used: the one asked for, else `Precision.preferred`.
    var chosenPrecision: Precision { precision ?? .preferred }

    func validate() throws {
        guard threads >= 1 else { throw ValidationError("--threads must be at least 1") }
        guard chosenPrecision.isNative || Kernels.path == .reference || Kernels.path == .scalar else {
            throw ValidationError("--precision bf16 needs a CPU with AVX512-BF16 or AMX-BF16 (this one has neither); use --precision f32")
        }
        guard BuildInfo.modelDirectory(model) != nil else {
            throw ValidationError("no model: pass --model DIR or set DLLAVA_MODEL")
        }
    }

    var modelDirectory: URL {
        URL(fileURLWithPath: BuildInfo.modelDirectory(model) ?? ".")
    }

    /// Sets threads, precision, the kernel path (`DLLAVA_KERNEL`, checked here) and the allocator's
    /// reuse of freed buffers, then loads.
    func load() throws -> LLaVAModel {
        AllocatorTuning.reuseFreedMemory()
        Parallelism.setThreads(threads)
        if let path = try Kernels.pathFromEnvironment() { Kernels.use(path) }
        Kernels.use(chosenPrecision)
        return try LLaVAModel.load(directory: modelDirectory)
    }
}

extension SparsityMode: ExpressibleByArgument {}
extension Precision: ExpressibleByArgument {}
extension OutputTokenRule: ExpressibleByArgument {}

struct Generate: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Generate text for one image and prompt.",
        discussion: """
        The prompt is the user's question; it is wrapped in the model's chat template (vicuna_v1) \
        with the image slot. For testing, --token-ids-before/--token-ids-after and --pixel-values \
        feed token ids and a pixel tensor directly instead of --prompt and --image.
        """)

    @OptionGroup var modelOptions: ModelOptions

    @Option(help: "Image file (JPEG or PNG).")
    var image: String?

    @Option(help: "The question about the image, e.g. \"Describe the image.\"")
    var prompt: String?

    @Flag(name: .customLong("apply-exif-orientation"), help: "Rotate the image as its EXIF orientation says (LLaVA does not).")
    var applyExifOrientation = false

    @Option(name: .customLong("token-ids-before"), help: "Testing: comma-separated token ids before the image slot (BOS first).")
    var tokenIDsBefore: String?

    @Option(name: .customLong("token-ids-after"), help: "Testing: comma-separated token ids after the image slot.")
    var tokenIDsAfter: String = ""

    @Option(name: .customLong("pixel-values"), help: "Testing: a safetensors file with normalised pixels [1, 3, S, S].")
    var pixelValues: String?

    @Option(name: .customLong("pixel-tensor"), help: "Testing: tensor name inside --pixel-values.")
    var pixelTensor = "pixel_values"

    @Option(name: .customLong("max-tokens"), help: "Most tokens to generate.")
    var maxTokens: Int = GenerationParameters.defaultMaxTokens

    @Option(help: "Sampling temperature; 0 is greedy.")
    var temperature: Float = 0

    @Option(name: .customLong("top-p"), help: "Nucleus sampling mass (1 = off).")
    var topP: Float = 1

    @Option(name: .customLong("top-k"), help: "Sample among the K most likely tokens (0 = off).")
    var topK: Int = 0

    @Option(help: "Random seed for sampling.")
    var seed: UInt64 = 0

    @Option(help: "Stop when the text contains this string (repeatable).")
    var stop: [String] = []

    @Option(help: "Report the top-K log-probabilities of every generated token (with --json).")
    var logprobs: Int = 0

    @Option(help: "Context sparsification: dynamic (Dynamic-LLaVA; the default for a checkpoint with sparse_config), full, fastv, random.")
    var sparsity: SparsityMode?

    @Option(name: .customLong("vision-keep-rate"), help: "Fraction of image tokens kept (default: sparse_config's vision_keep_rate, 0.2; FastV 0.25).")
    var visionKeepRate: Double?

    @Flag(name: .customLong("no-kv-cache"), help: "Recompute the whole sequence every step instead of keeping a KV cache.")
    var noKVCache = false

    @Option(name: .customLong("fastv-layer"), help: "FastV's K: prune after layer K using layer K-1's attention.")
    var fastVLayer = 3

    @Option(name: .customLong("output-tokens"), help: """
        Dynamic sparsity with a KV cache: which generated tokens' K/V are kept above the sparse layer: \
        learned (the output-text predictor), or the baselines random (--output-keep-rate) and every-other.
        """)
    var outputTokens: OutputTokenRule = .learned

    @Option(name: .customLong("output-keep-rate"), help: "Keep probability of --output-tokens random (default: sparse_config's output_text_keep_rate).")
    var outputKeepRate: Double?

    @Flag(help: "Print one JSON object: text, token_ids, finish_reason, logprobs, stats.")
    var json = false

    @Option(name: .customLong("kept-patches"), help: ArgumentHelp("""
        Also write a PNG of the image as the vision tower saw it (padded, resized, cropped) with the image patches \
        that were dropped darkened and the kept ones outlined (every patch kept without pruning).
        """, valueName: "png"))
    var keptPatches: String?

    func validate() throws {
        guard maxTokens >= 1 else { throw ValidationError("--max-tokens must be at least 1") }
        guard temperature >= 0 else { throw ValidationError("--temperature must not be negative") }
        guard topP > 0 && topP <= 1 else { throw ValidationError("--top-p must be in (0, 1]") }
        guard topK >= 0, logprobs >= 0 else { throw ValidationError("--top-k and --logprobs must not be negative") }
        if let visionKeepRate, !(visionKeepRate > 0 && visionKeepRate <= 1) { throw ValidationError("--vision-keep-rate must be in (0, 1]") }
        if let outputKeepRate, !(outputKeepRate >= 0 && outputKeepRate <= 1) { throw ValidationError("--output-keep-rate must be in [0, 1]") }
        if outputKeepRate != nil, outputTokens != .random { throw ValidationError("--output-keep-rate goes with --output-tokens random") }
        if tokenIDsBefore == nil {
            guard prompt != nil else { throw ValidationError("pass --prompt TEXT (and --image PATH)") }
            guard pixelValues == nil else { throw ValidationError("--pixel-values goes with --token-ids-before, not --prompt") }
        } else {
            guard prompt == nil, image == nil else { throw ValidationError("use either --prompt/--image or --token-ids-before/--pixel-values") }
        }
        if keptPatches != nil, image == nil { throw ValidationError("--kept-patches needs --image") }
    }

    func run() throws {
        try reportingFailures {
            if let keptPatches { try checkOutputFile(keptPatches, option: "--kept-patches", database: nil) }
            let loadStart = DispatchTime.now()
            let model = try modelOptions.load()
            let loadMilliseconds = Double(DispatchTime.now().uptimeNanoseconds - loadStart.uptimeNanoseconds) / 1e6
            let sampling = SamplingParameters(temperature: temperature, topK: topK, topP: topP, seed: seed)
            let mode = sparsity ?? Generator(model: model).defaultSparsityMode
            var parameters = GenerationParameters(
                maxTokens: maxTokens, sampling: sampling, stop: stop, logprobs: logprobs, endOfSequence: model.endOfSequenceTokenID,
                sparsity: SparsityParameters(mode: mode, visionKeepRate: visionKeepRate, usesKeyValueCache: !noKVCache, fastVLayer: fastVLayer,
                                             outputTokens: outputTokens, outputKeepRate: outputKeepRate))
            let request: GenerationRequest
            let generator: Generator
            var pipeline: LLaVAPipeline?
            if let tokenIDsBefore {
                request = GenerationRequest(
                    idsBeforeImage: try parseIDs(tokenIDsBefore, option: "--token-ids-before"), pixelValues: try pixelValues.map(readPixels),
                    idsAfterImage: try parseIDs(tokenIDsAfter, option: "--token-ids-after"), parameters: parameters)
                generator = Generator(model: model)
            } else {
                let loaded = try LLaVAPipeline(model: model, decoderOptions: ImageDecoder.Options(applyExifOrientation: applyExifOrientation))
                pipeline = loaded
                parameters.endOfSequence = loaded.endOfSequenceTokenID
                if let image {
                    request = try loaded.request(imageAt: URL(fileURLWithPath: image), question: prompt ?? "", parameters: parameters)
                } else {
                    let tokens = loaded.template.tokens(question: prompt ?? "", tokenizer: loaded.tokenizer)
                    request = GenerationRequest(idsBeforeImage: tokens.idsBeforeImage + tokens.idsAfterImage, pixelValues: nil,
                                                idsAfterImage: [], parameters: parameters)
                }
                generator = loaded.generator
            }
            var result = try generator.generate([request])[0]
            result.stats.loadMilliseconds = loadMilliseconds
            if let keptPatches, let image, let pipeline {
                let drawn = try pipeline.keptPatchesImage(imageAt: URL(fileURLWithPath: image), keptImageIndices: result.keptImageIndices)
                do {
                    try AtomicFile.write(try drawn.pngData(), to: URL(fileURLWithPath: keptPatches))
                } catch {
                    throw CommandFailure(message: "--kept-patches: cannot write \(keptPatches): \(error)", code: 74)
                }
            }
            if json {
                let encoder = JSONEncoder()
                encoder.outputFormatting = [.sortedKeys]
                print(String(decoding: try encoder.encode(result), as: UTF8.self))
            } else {
                print(tokenIDsBefore != nil ? result.tokenIDs.map(String.init).joined(separator: " ") : result.text)
            }
        }
    }

    func parseIDs(_ text: String, option: String) throws -> [Int32] {
        try text.split(separator: ",").map { part in
            guard let id = Int32(part.trimmingCharacters(in: .whitespaces)) else {
                throw CommandFailure(message: "\(option): '\(part)' is not a token id", code: 64)
            }
            return id
        }
    }

    func readPixels(_ path: String) throws -> [Float] {
        let file = try SafeTensorsFile(path: path)
        guard let tensor = file.tensors[pixelTensor] else {
            throw CommandFailure(message: "\(path): no tensor named \(pixelTensor)", code: 65)
        }
        return try tensor.floats()
    }
}
