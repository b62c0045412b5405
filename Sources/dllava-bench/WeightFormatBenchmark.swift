// The matrix products alone in each weight format: a preset's decoder layers at M = 1 (decode,
// one row), 8 (decode, 8 rows) and a prefill's rows, f16 weights in f32 and bf16 precision against
// the same weights quantized to q8. Each figure is the best of several repeats, and the formats
// take turns within every repeat, so that a machine shared with other work disturbs the ratios as
// little as it can. Every product is also given as a fraction of the machine's ceilings measured
// in the same run (Ceilings.swift): of the read bandwidth (weights streamed; what bounds one row)
// and of its instruction's register-only peak (f32 FMA, vdpbf16ps, vpdpbusd; what bounds a prompt).
import ArgumentParser
import Dispatch
import Foundation
import Numerics

struct WeightFormatBenchmark: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "weights",
        abstract: "Decoder-layer products at decode and prefill row counts: f16 (f32, bf16 precision) vs q8, best of N, interleaved.")

    @Option(help: "tiny, mid, bench-1.57b or llava-1.5-7b.")
    var preset = "bench-1.57b"

    @Option(help: "Comma-separated thread counts.")
    var threads = "2,1"

    @Option(help: "Comma-separated row counts (M) of the products.")
    var rows = "1,8,640"

    @Option(help: "Distinct layers of weights cycled through (enough that they do not fit in cache).")
    var layers = 4

    @Option(help: "Repeats; each figure is the fastest.")
    var repeats = 5

    @Option(help: "wall (elapsed time) or cpu (the process's CPU time over the thread count: for a machine shared with other work).")
    var clock = BenchmarkClock.wall

    @Option(name: .customLong("read-buffer-mb"), help: "Size of the buffer read for the bandwidth ceiling, MiB (much larger than the last-level cache).")
    var readBufferMegabytes = 1024

    func run() throws {
        AllocatorTuning.reuseFreedMemory()  // as `dllava run` and `generate` allocate
        guard let preset = Preset.all[preset] else { throw ValidationError("unknown preset \(preset)") }
        let c = preset.language
        let shapes = decoderProductShapes(c)
        let f16 = (0..<layers).flatMap { layer in
            shapes.enumerated().map { index, shape in
                WeightMatrix(randomRows: shape.0, columns: shape.1, storageType: .float16, seed: UInt64(1000 * layer + index))
            }
        }
        let q8 = f16.map { $0.quantizedQ8()! }
        let variants: [(name: String, weights: [WeightMatrix], precision: Precision)] =
            [("f16 weights, f32", f16, .f32)] + (Precision.bf16.isNative ? [("f16 weights, bf16", f16, .bf16)] : []) + [("q8", q8, .f32)]
        let bytes = variants.map { variant in variant.weights.reduce(0) { $0 + $1.byteCount } }
        let flopsPerRow = Double(f16.reduce(0) { $0 + 2 * $1.rows * $1.columns })
        print("# dllava-bench weights: \(preset.name), \(layers) layers x \(shapes.count) products (\(bytes[0] >> 20) MiB of f16); kernel path \(Kernels.path.rawValue); best of \(repeats); \(clock.rawValue) clock")
        let buffer = ReadBuffer(byteCount: readBufferMegabytes << 20)
        var lines: [String] = []
        for threadCount in threads.split(separator: ",").compactMap({ Int($0) }) {
            Parallelism.setThreads(threadCount)
            // Ceilings measured between the repeats too, so that they see the same load as the products.
            var ceilings = Ceilings.measure(threads: threadCount, buffer: buffer, clock: clock)
            var measured: [(m: Int, index: Int, seconds: Double, perRowAtOne: Double)] = []
            var perRowAtOne: [Double] = []
            for m in rows.split(separator: ",").compactMap({ Int($0) }) {
                let inputs = Dictionary(uniqueKeysWithValues: Set(shapes.map(\.1)).map { k in
                    (k, Matrix(rows: m, columns: k, values: (0..<m * k).map { Float(($0 * 7919) % 255) / 255 - 0.5 }))
                })
                var best = [Double](repeating: .infinity, count: variants.count)
                for _ in 0..<repeats {
                    for (index, variant) in variants.enumerated() {
                        Kernels.use(variant.precision)
                        let start = clock.now()
                        for weight in variant.weights { _ = linear(inputs[weight.columns]!, weight) }
                        best[index] = min(best[index], clock.seconds(since: start, threads: threadCount))
                    }
                    ceilings = ceilings.merged(with: Ceilings.measure(threads: threadCount, buffer: buffer, clock: clock, repeats: 1))
                }
                Kernels.use(Precision.f32)
                if perRowAtOne.isEmpty || m == 1 { perRowAtOne = best }
                for index in variants.indices { measured.append((m, index, best[index], perRowAtOne[index])) }
            }
            print(ceilings.line(threads: threadCount))
            for row in measured {
                let variant = variants[row.index], time = row.seconds
                let bandwidth = Double(bytes[row.index]) / time / 1e9, rate = flopsPerRow * Double(row.m) / time / 1e9
                let peak = variant.weights[0].storageType == .q8 ? ceilings.vnni : variant.precision == .bf16 ? ceilings.bf16 : ceilings.fma
                let fastest = measured.first { $0.m == row.m && $0.index == 0 }!.seconds
                lines.append(String(format: "| %d | %d | %@ | %.2f | %.1f | %.2f | %.1f | %@ | %.2fx | %.2fx |", threadCount, row.m, variant.name,
                                   time / Double(layers) * 1000, bandwidth, bandwidth / ceilings.read, rate,
                                   peak.map { String(format: "%.2f", rate / $0) } ?? "n/a", fastest / time, row.perRowAtOne * Double(row.m) / time))
            }
        }
        print("")
        print("| threads | M | format | ms per layer | GB/s of weights | of read ceiling | GFLOP/s | of instruction peak | vs f16 f32 | rows/s vs M=1 (same format) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        lines.forEach { print($0) }
    }
}
