// Engine benchmark: random weights at a preset shape, timed with 1 and 2 threads in one run,
// next to OpenBLAS sgemm GFLOPS on the same GEMM shapes and the machine's memory read rate, so
// every figure comes with the baseline it should be judged against.
import ArgumentParser
import CBLAS
import Dispatch
import DynamicLLaVA
import Foundation
import Llama
import Numerics
import Vision

extension Precision: ExpressibleByArgument {}

struct Preset {
    var name: String
    let vision: CLIPVisionConfiguration
    let language: LlamaConfiguration
    let storageType: StorageType

    static let all: [String: Preset] = [
        "tiny": Preset(name: "tiny",
                       vision: CLIPVisionConfiguration(hiddenSize: 32, intermediateSize: 64, hiddenLayers: 3, attentionHeads: 4, imageSize: 336, patchSize: 14),
                       language: LlamaConfiguration(vocabularySize: 1000, hiddenSize: 64, intermediateSize: 176, hiddenLayers: 3, attentionHeads: 4, rmsNormEpsilon: 1e-5),
                       storageType: .float32),
        "mid": Preset(name: "mid (CLIP-B/14-336 + 1.1B LLaMA, f16)",
                      vision: CLIPVisionConfiguration(hiddenSize: 768, intermediateSize: 3072, hiddenLayers: 12, attentionHeads: 12, imageSize: 336, patchSize: 14),
                      language: LlamaConfiguration(vocabularySize: 32000, hiddenSize: 2048, intermediateSize: 5632, hiddenLayers: 22, attentionHeads: 32, keyValueHeads: 32, rmsNormEpsilon: 1e-5),
                      storageType: .float16),
        "bench-1.57b": Preset(name: "bench-1.57b (CLIP-L/14-336 + LLaMA 2048 x 22, 32 heads, FFN 5632; f16)",
                              vision: CLIPVisionConfiguration(hiddenSize: 1024, intermediateSize: 4096, hiddenLayers: 24, attentionHeads: 16, imageSize: 336, patchSize: 14),
                              language: LlamaConfiguration(vocabularySize: 32000, hiddenSize: 2048, intermediateSize: 5632, hiddenLayers: 22, attentionHeads: 32, keyValueHeads: 32, rmsNormEpsilon: 1e-5),
                              storageType: .float16),
        "llava-1.5-7b": Preset(name: "llava-1.5-7b (CLIP-L/14-336 + Vicuna-7B shape, f16)",
                               vision: CLIPVisionConfiguration(hiddenSize: 1024, intermediateSize: 4096, hiddenLayers: 24, attentionHeads: 16, imageSize: 336, patchSize: 14),
                               language: LlamaConfiguration(vocabularySize: 32000, hiddenSize: 4096, intermediateSize: 11008, hiddenLayers: 32, attentionHeads: 32, rmsNormEpsilon: 1e-5, maxPositionEmbeddings: 4096),
                               storageType: .float16),
    ]
}

@main
struct BenchmarkCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dllava-bench",
        abstract: "Benchmarks with random weights at a preset shape (tiny, mid, llava-1.5-7b); Markdown tables.",
        subcommands: [EngineBenchmark.self, SparsityBenchmark.self, WeightFormatBenchmark.self, SnapshotEncodingBenchmark.self],
        defaultSubcommand: EngineBenchmark.self)
}

struct EngineBenchmark: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "engine",
        abstract: "Vision, prefill and decode speed against sgemm and memory bandwidth, 1 and 2 threads.",
        discussion: "Presets: \(Preset.all.keys.sorted().joined(separator: ", ")). Prints a Markdown table.")

    @Option(help: "tiny, mid, bench-1.57b or llava-1.5-7b.")
    var preset = "tiny"

    @Option(help: "Model directories (either checkpoint layout), comma-separated, to measure one after the other in this run instead of a preset's random weights (e.g. an f16 model and its `dllava quantize` copy).")
    var model: String?

    @Option(help: "Comma-separated thread counts to measure.")
    var threads = "1,2"

    @Option(name: .customLong("text-tokens"), help: "Text tokens around the image (about 35 before, the rest after).")
    var textTokens = 40

    @Option(name: .customLong("decode-tokens"), help: "Decode steps timed per batch size.")
    var decodeTokens = 8

    @Option(name: .customLong("context-tokens"), help: "Generated tokens already in every decode row's cache when timing starts (copies of prompt cells at the following positions), to time decode and measure memory late in a long caption.")
    var contextTokens = 0

    @Option(help: "Comma-separated weight formats of a preset's random weights, measured one after the other in this run (f32, f16, bf16, q8; default: the preset's). q8 stores every weight matrix of the preset in q8, the embeddings and the LM head included.")
    var weights: String?

    @Option(help: "Comma-separated precisions to measure (f32, bf16).")
    var precisions = Precision.bf16.isNative ? "f32,bf16" : "f32"

    func run() throws {
        AllocatorTuning.reuseFreedMemory()  // as `dllava run` and `generate` allocate
        guard let preset = Preset.all[preset] else { throw ValidationError("unknown preset \(preset)") }
        let threadCounts = threads.split(separator: ",").compactMap { Int($0) }
        let precisionList = try precisions.split(separator: ",").map { name in
            guard let precision = Precision(rawValue: String(name)), precision.isNative else {
                throw ValidationError("precision \(name) is unknown or not native on this CPU")
            }
            return precision
        }
        guard let model else {
            let names = ["f32": StorageType.float32, "f16": .float16, "bf16": .bfloat16, "q8": .q8]
            let storageTypes = try weights.map { list in
                try list.split(separator: ",").map { name in
                    guard let type = names[String(name)] else { throw ValidationError("unknown weight format \(name) (f32, f16, bf16, q8)") }
                    return type
                }
            } ?? [preset.storageType]
            for storageType in storageTypes {
                try measure(preset: Preset(name: preset.name + ", weights \(storageType.rawValue)", vision: preset.vision, language: preset.language,
                                           storageType: storageType),
                            threadCounts: threadCounts, precisionList: precisionList, directory: nil)
            }
            return
        }
        for directory in model.split(separator: ",") {
            try measure(preset: preset, threadCounts: threadCounts, precisionList: precisionList, directory: String(directory))
        }
    }

    /// One table: the preset's random weights, or the model in `directory`.
    func measure(preset: Preset, threadCounts: [Int], precisionList: [Precision], directory: String?) throws {
        var preset = preset
        let start = DispatchTime.now()
        let vision: CLIPVisionTower, language: LlamaModel
        if let directory {
            let loaded = try LLaVAModel.load(directory: URL(fileURLWithPath: directory))
            (vision, language) = (loaded.vision, loaded.language)
            preset = Preset(name: "model \(directory)", vision: vision.configuration, language: language.configuration,
                            storageType: language.storageType)
        } else {
            vision = CLIPVisionTower(randomWeights: preset.vision, selectLayer: -2, storageType: preset.storageType, seed: 1)
            language = LlamaModel(randomWeights: preset.language, storageType: preset.storageType, seed: 2)
        }
        print("# dllava-bench: \(preset.name)")
        print("machine: \(ProcessInfo.processInfo.activeProcessorCount) cores, \(ProcessInfo.processInfo.physicalMemory >> 30) GiB; weights \(preset.storageType.rawValue); kernel path \(Kernels.path.rawValue)")
        print(String(format: "model ready in %.1f s; language weights %.2f GiB", seconds(since: start), Double(language.weightByteCount) / Double(1 << 30)))

        let c = preset.language
        let before = min(35, textTokens), after = textTokens - before
        let promptLength = before + preset.vision.patchCount + after
        let pixels = (0..<3 * preset.vision.imageSize * preset.vision.imageSize).map { Float(($0 * 7919) % 255) / 127.5 - 1 }
        print("prompt: \(before) + \(preset.vision.patchCount) image + \(after) = \(promptLength) tokens; decode \(decodeTokens) steps")
        print("")
        // Dynamic-LLaVA's cache: every prompt cell below the sparse layer, above it the text and a fifth
        // of the image (115 of 576 kept, as the trained predictor keeps), so decode reads what it reads there.
        let sparseLayer = 2
        let imageRange = before ..< before + preset.vision.patchCount
        let keptPrompt = (0..<promptLength).filter { !imageRange.contains($0) || ($0 - before) % 5 == 0 }
        print("decode on two caches: full (\(promptLength) cells per layer) and dynamic (\(promptLength) cells in layers 0..<\(sparseLayer), \(keptPrompt.count) above)"
              + (contextTokens > 0 ? ", each with \(contextTokens) generated tokens' cells more" : ""))
        print("")
        print("| threads | precision | vision ms/image | vision GFLOP/s | prefill tok/s | prefill GFLOP/s | GEMM GFLOP/s (prefill shapes) | sgemm GFLOP/s (same shapes) | GEMM / sgemm | prefill / sgemm | vision / sgemm | decode tok/s b=1 | decode tok/s b=8 | b=8 / b=1 | dynamic cache: decode tok/s b=1 | b=8 | b=8 / b=1 | weight-stream ms | decode b=1 ms/tok / stream |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        // The tower runs the encoder layers up to the hidden state it selects (-2: all but the last).
        let selected = vision.selectLayer < 0 ? preset.vision.hiddenLayers + 1 + vision.selectLayer : vision.selectLayer
        let visionFlops = Double(visionFlopCount(preset.vision, layers: selected))
        for (count, precision) in threadCounts.flatMap({ count in precisionList.map { (count, $0) } }) {
            Parallelism.setThreads(count)
            Kernels.use(precision)
            // A weight is packed for this precision's kernels on its first product: once, untimed
            // (one image through the tower, one token through the language model).
            _ = vision.features(pixels)
            let storage = KeyValueCache.storage(for: precision)
            var warmCache = KeyValueCache(layers: c.hiddenLayers, sequences: 1, keyValueWidth: c.keyValueWidth, storage: storage)
            var warmHidden = language.embed([3])
            var warmObservation = ForwardObservation()
            language.forward(&warmHidden, batch: TokenBatch(positions: [0], sequences: [0]), layers: 0..<c.hiddenLayers, cache: &warmCache,
                             observation: &warmObservation)
            _ = language.logits(warmHidden)
            // Vision tower (one image).
            let visionStart = DispatchTime.now()
            _ = vision.features(pixels)
            let visionSeconds = seconds(since: visionStart)

            // Prefill over the whole prompt (embeddings of random ids stand in for the image rows).
            var cache = KeyValueCache(layers: c.hiddenLayers, sequences: 1, keyValueWidth: c.keyValueWidth, storage: storage)
            let promptIDs = (0..<promptLength).map { Int32(3 + $0 % (c.vocabularySize - 3)) }
            var hidden = language.embed(promptIDs)
            var observation = ForwardObservation()
            let prefillStart = DispatchTime.now()
            language.forward(&hidden, batch: TokenBatch(positions: (0..<Int32(promptLength)).map { $0 }, sequences: Array(repeating: 0, count: promptLength)),
                             layers: 0..<c.hiddenLayers, cache: &cache, observation: &observation)
            _ = language.logits(hidden.rows((promptLength - 1)..<promptLength))
            let prefillSeconds = seconds(since: prefillStart)
            let prefillFlops = Double(prefillFlopCount(c, tokens: promptLength))
            let gemmRate = sgemmRate(c, tokens: promptLength, threads: count)
            let kernelRate = linearRate(c, tokens: promptLength, storageType: preset.storageType)

            // The dynamic cache (untimed): layers below the sparse layer over the whole prompt, the
            // layers above over the kept tokens only.
            var dynamicCache = KeyValueCache(layers: c.hiddenLayers, sequences: 1, keyValueWidth: c.keyValueWidth, storage: storage)
            var dynamicHidden = language.embed(promptIDs)
            var dynamicObservation = ForwardObservation()
            let promptBatch = TokenBatch(positions: (0..<Int32(promptLength)).map { $0 }, sequences: Array(repeating: 0, count: promptLength))
            language.forward(&dynamicHidden, batch: promptBatch, layers: 0..<sparseLayer, cache: &dynamicCache, observation: &dynamicObservation)
            var keptHidden = Matrix(rows: keptPrompt.count, columns: c.hiddenSize,
                                    values: keptPrompt.flatMap { dynamicHidden.rows($0 ..< $0 + 1).values })
            language.forward(&keptHidden, batch: promptBatch.selecting(keptPrompt), layers: sparseLayer..<c.hiddenLayers, cache: &dynamicCache,
                             observation: &dynamicObservation)

            // Decode at batch 1 and 8 on each cache (the batch-8 caches are copies of the prefilled one).
            var rates: [Double] = []
            var batchOneStep = 0.0
            for prefilled in [cache, dynamicCache] {
                for batch in [1, 8] {
                    var decodeCache = KeyValueCache(layers: c.hiddenLayers, sequences: batch, keyValueWidth: c.keyValueWidth, storage: storage)
                    // Each row its own copy of the prefilled cells, with room for the steps to come (as a
                    // request's cache has), so that timing does not include copy-on-write of shared cells.
                    for l in 0..<c.hiddenLayers {
                        decodeCache.layers[l] = (0..<batch).map { _ in
                            var cells = withGeneratedContext(prefilled.layers[l][0], count: contextTokens, after: promptLength)
                            cells.reserveCapacity(additionalCells: decodeTokens, width: c.keyValueWidth)
                            return cells
                        }
                    }
                    let decodeStart = DispatchTime.now()
                    for step in 0..<decodeTokens {
                        var stepHidden = language.embed((0..<batch).map { Int32(5 + ($0 + step) % 900) })
                        var stepObservation = ForwardObservation()
                        language.forward(&stepHidden, batch: TokenBatch(positions: Array(repeating: Int32(promptLength + contextTokens + step), count: batch),
                                                                        sequences: Array(0..<batch)),
                                         layers: 0..<c.hiddenLayers, cache: &decodeCache, observation: &stepObservation)
                        _ = language.logits(stepHidden)
                    }
                    let elapsed = seconds(since: decodeStart)
                    rates.append(Double(batch * decodeTokens) / elapsed)
                    if batch == 1 && rates.count == 1 { batchOneStep = elapsed / Double(decodeTokens) }
                }
            }
            let streamSeconds = Double(language.weightByteCount) / memoryReadRate(threads: count)
            print(String(format: "| %d | %@ | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.1f | %.2f |",
                         count, precision.rawValue, visionSeconds * 1000, visionFlops / visionSeconds / 1e9,
                         Double(promptLength) / prefillSeconds, prefillFlops / prefillSeconds / 1e9,
                         kernelRate / 1e9, gemmRate / 1e9, kernelRate / gemmRate, prefillFlops / prefillSeconds / gemmRate,
                         visionFlops / visionSeconds / gemmRate, rates[0], rates[1], rates[1] / rates[0], rates[2], rates[3], rates[3] / rates[2],
                         streamSeconds * 1000, batchOneStep / streamSeconds))
        }
        var usage = rusage()
        getrusage(RUSAGE_SELF.rawValue, &usage)
        print("")
        print(String(format: "peak RSS: %.2f GiB", Double(usage.ru_maxrss) / Double(1 << 20)))
        print("")
    }
}

/// `cells` followed by `count` more at positions `after..<after + count`, their keys and values
/// those of the existing cells, cycled (the values a decode step reads do not change its speed).
func withGeneratedContext(_ cells: SequenceCells, count: Int, after: Int) -> SequenceCells {
    guard count > 0 else { return cells }
    let rowBytes = cells.keys.count / cells.cellCount
    var keys = cells.keys, values = cells.values
    keys.reserveCapacity(keys.count + count * rowBytes)
    values.reserveCapacity(values.count + count * rowBytes)
    for i in 0..<count {
        let source = (i % cells.cellCount) * rowBytes
        keys.append(contentsOf: cells.keys[source ..< source + rowBytes])
        values.append(contentsOf: cells.values[source ..< source + rowBytes])
    }
    return SequenceCells(storage: cells.storage, positions: cells.positions + (0..<Int32(count)).map { Int32(after) + $0 },
                         keys: keys, values: values)
}

/// Prints and flushes at once, so rows appear as they are measured, also in a log file.
func print(_ line: String) {
    FileHandle.standardOutput.write(Data((line + "\n").utf8))
}

func seconds(since start: DispatchTime) -> Double {
    Double(DispatchTime.now().uptimeNanoseconds - start.uptimeNanoseconds) / 1e9
}

/// Multiply-adds x2 of a full prefill: the decoder's projections and causal attention, and the
/// LM head row.
func prefillFlopCount(_ c: LlamaConfiguration, tokens n: Int) -> Int {
    let h = c.hiddenSize, q = c.attentionHeads * c.headDimension
    let projections = 2 * n * h * (q + 2 * c.keyValueWidth) + 2 * n * q * h + 3 * 2 * n * h * c.intermediateSize
    let attention = 2 * 2 * q * (n * (n + 1) / 2)
    return c.hiddenLayers * (projections + attention) + 2 * h * c.vocabularySize
}

/// OpenBLAS sgemm FLOP/s over one decoder layer's product shapes (f32 weights already widened),
/// `[tokens, K] x [K, N]`, each one call with OpenBLAS's own `threads` threads: the ceiling the
/// prefill is measured against.
func sgemmRate(_ c: LlamaConfiguration, tokens m: Int, threads: Int) -> Double {
    openblas_set_num_threads(Int32(threads))
    defer { openblas_set_num_threads(1) }
    var flops = 0.0, elapsed = 0.0
    for (n, k) in decoderProductShapes(c) {
        let a = [Float](repeating: 0.01, count: m * k), b = [Float](repeating: 0.02, count: n * k)
        var out = [Float](repeating: 0, count: m * n)
        let start = DispatchTime.now()
        a.withUnsafeBufferPointer { ap in
            b.withUnsafeBufferPointer { bp in
                out.withUnsafeMutableBufferPointer { op in
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, blasint(m), blasint(n), blasint(k), 1, ap.baseAddress!, blasint(k), bp.baseAddress!, blasint(k), 0, op.baseAddress!, blasint(n))
                }
            }
        }
        elapsed += seconds(since: start)
        flops += 2 * Double(m * n * k)
    }
    return flops / elapsed
}

/// `(N, K)` of one decoder layer's weight products: q, k, v, o, gate, up, down.
func decoderProductShapes(_ c: LlamaConfiguration) -> [(Int, Int)] {
    let h = c.hiddenSize, q = c.attentionHeads * c.headDimension
    return [(q, h), (c.keyValueWidth, h), (c.keyValueWidth, h), (h, q), (c.intermediateSize, h), (c.intermediateSize, h), (h, c.intermediateSize)]
}

/// The engine's `linear` FLOP/s over the same shapes as `sgemmRate`, weights as stored, at the
/// current `Kernels.precision` and thread count.
func linearRate(_ c: LlamaConfiguration, tokens m: Int, storageType: StorageType) -> Double {
    var flops = 0.0, elapsed = 0.0
    for (index, (n, k)) in decoderProductShapes(c).enumerated() {
        let weight = WeightMatrix(randomRows: n, columns: k, storageType: storageType, seed: UInt64(100 + index))
        let x = Matrix(rows: m, columns: k, values: (0..<m * k).map { Float(($0 * 7919) % 255) / 255 - 0.5 })
        _ = linear(x.rows(0..<1), weight)  // packs the weight, untimed
        let start = DispatchTime.now()
        _ = linear(x, weight)
        elapsed += seconds(since: start)
        flops += 2 * Double(m * n * k)
    }
    return flops / elapsed
}

/// Multiply-adds x2 of the vision tower on one image: patch embedding, the encoder layers'
/// projections, MLP and attention of the `layers` it runs.
func visionFlopCount(_ v: CLIPVisionConfiguration, layers: Int) -> Int {
    let t = v.patchCount + 1, h = v.hiddenSize
    let perLayer = 2 * t * h * h * 4 + 2 * 2 * t * h * v.intermediateSize + 2 * 2 * t * t * h
    return 2 * v.patchCount * 3 * v.patchSize * v.patchSize * h + layers * perLayer
}

/// Bytes per second at which `threads` threads read a 1 GiB buffer (best of 3). The reads are
/// summed as integers, which the compiler vectorises (a float sum would be bound by add latency
/// and understate the bandwidth).
func memoryReadRate(threads: Int) -> Double {
    let count = 1 << 27
    let buffer = UnsafeMutablePointer<UInt64>.allocate(capacity: count)
    defer { buffer.deallocate() }
    buffer.initialize(repeating: 1, count: count)
    let shared = UncheckedPointer(buffer)
    var best = Double.infinity
    for _ in 0..<3 {
        let start = DispatchTime.now()
        DispatchQueue.concurrentPerform(iterations: threads) { t in
            let chunk = count / threads
            let base = shared.pointer + t * chunk
            var sum: UInt64 = 0
            for i in 0..<chunk { sum &+= base[i] }
            if sum == 0 { print("") }
        }
        best = min(best, seconds(since: start))
    }
    return Double(count * 8) / best
}

struct UncheckedPointer: @unchecked Sendable {
    let pointer: UnsafeMutablePointer<UInt64>
    init(_ pointer: UnsafeMutablePointer<UInt64>) { self.pointer = pointer }
}
