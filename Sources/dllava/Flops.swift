import ArgumentParser
import Foundation
import Sparsification

struct Flops: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Compute the paper's prefill FLOPs table (docs/DYNAMIC_LLAVA.md section 8) from Eq. 13.",
        discussion: "Per layer 32 N C^2 + 4 N^2 C for N image tokens, hidden size C; Dynamic-LLaVA keeps Int(576 x 0.2) = 115 image tokens from layer 2 on, FastV round(576 x 0.25) = 144 from layer K = 3 on.")

    enum Preset: String, ExpressibleByArgument, CaseIterable {
        case llava7b = "llava-1.5-7b"
        case llava13b = "llava-1.5-13b"

        var shape: (layers: Int, hidden: Int) { self == .llava7b ? (32, 4096) : (40, 5120) }
    }

    @Option(help: "llava-1.5-7b or llava-1.5-13b.")
    var preset: Preset

    @Flag(help: "Print JSON.")
    var json = false

    func run() throws {
        let (layers, c) = preset.shape
        let n = 576
        let dynamicKept = Int(Double(n) * 0.2), fastVKept = Int((Double(n) * (1 - 0.75)).rounded())
        let full = PaperFlops.full(layers: layers, imageTokens: n, hiddenSize: c)
        let dynamic = PaperFlops.pruned(layers: layers, first: 2, imageTokens: n, kept: dynamicKept, hiddenSize: c)
        let fastV = PaperFlops.pruned(layers: layers, first: 3, imageTokens: n, kept: fastVKept, hiddenSize: c)
        if json {
            let object: [String: Any] = ["preset": preset.rawValue, "full_tflops": full / 1e12, "dynamic_tflops": dynamic / 1e12,
                                         "fastv_tflops": fastV / 1e12, "dynamic_reduction": 1 - dynamic / full, "fastv_reduction": 1 - fastV / full]
            print(String(decoding: try JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]), as: UTF8.self))
        } else {
            print("| model | full | Dynamic-LLaVA | FastV (k=3, r=0.75) |")
            print("|---|---|---|---|")
            print(String(format: "| %@ | %.2f T | %.2f T (-%.1f%%) | %.2f T (-%.1f%%) |", preset.rawValue, full / 1e12,
                         dynamic / 1e12, 100 * (1 - dynamic / full), fastV / 1e12, 100 * (1 - fastV / full)))
        }
    }
}
