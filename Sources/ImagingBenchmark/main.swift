// Times decode + CLIP preprocessing per image over a directory of sample images, single-threaded,
// and measures what TurboJPEG decode-time downscaling would cost in parity.
//
//     swift run -c release ImagingBenchmark [images_dir] [repetitions]
//
// images_dir defaults to Tests/Fixtures/images (run from the repository root). Not a test: numbers depend on
// the machine.
import Foundation
import Imaging

let arguments = CommandLine.arguments
let directory = URL(fileURLWithPath: arguments.count > 1 ? arguments[1] : "Tests/Fixtures/images")
let repetitions = arguments.count > 2 ? max(1, Int(arguments[2]) ?? 20) : 20

func cpuModel() -> String {
    guard let info = try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8) else { return "unknown CPU" }
    let line = info.split(separator: "\n").first { $0.hasPrefix("model name") }
    return line.map { String($0.split(separator: ":", maxSplits: 1).last ?? "").trimmingCharacters(in: .whitespaces) } ?? "unknown CPU"
}

func milliseconds(_ body: () throws -> Void) rethrows -> Double {
    let start = DispatchTime.now().uptimeNanoseconds
    try body()
    return Double(DispatchTime.now().uptimeNanoseconds - start) / 1e6
}

func median(_ xs: [Double]) -> Double {
    let s = xs.sorted()
    return s.count % 2 == 1 ? s[s.count / 2] : (s[s.count / 2 - 1] + s[s.count / 2]) / 2
}

let names = ((try? FileManager.default.contentsOfDirectory(atPath: directory.path)) ?? [])
    .filter { !$0.hasPrefix("bad_") && ($0.hasSuffix(".png") || $0.hasSuffix(".jpg")) }.sorted()
guard !names.isEmpty else {
    FileHandle.standardError.write("no images in \(directory.path)\n".data(using: .utf8)!)
    exit(66)
}

let preprocessor = CLIPImagePreprocessor()
let full = ImageDecoder()
let scaled = ImageDecoder(options: .init(jpegMinimumLongSide: preprocessor.resolution))

print("machine: \(cpuModel()), \(ProcessInfo.processInfo.activeProcessorCount) cores visible; threads used: 1")
print("images: \(names.count) from \(directory.path); \(repetitions) repetitions, median ms; files read from page cache")
print("")
print("decode, preprocess, total: medians; min: fastest total; literal: preprocess with the padded square built (plain version)")
print("image                       size       decode  preprocess  total  min    literal | jpeg-scaled: size   total  speedup  max|d|   mean|d|")

var totals: [Double] = [], scaledTotals: [Double] = [], minTotals: [Double] = []
var worstMax: Float = 0
for name in names {
    let url = directory.appendingPathComponent(name)
    let data = try Data(contentsOf: url)
    var decodeTimes: [Double] = [], preprocessTimes: [Double] = [], scaledTimes: [Double] = []
    var literalTimes: [Double] = [], totalTimes: [Double] = []
    var image = try full.decode(data: data, name: name)
    var reference: [Float] = []
    for _ in 0..<repetitions {
        decodeTimes.append(try milliseconds { image = try full.decode(data: data, name: name) })
        preprocessTimes.append(milliseconds { reference = preprocessor.pixelValues(for: image) })
        totalTimes.append(decodeTimes.last! + preprocessTimes.last!)
        var literal: [Float] = []
        literalTimes.append(milliseconds { literal = preprocessor.normalised(preprocessor.referenceCroppedSquare(for: image)) })
        precondition(literal == reference, "fast and literal preprocessing differ on \(name)")
    }
    var small = image
    var values: [Float] = []
    for _ in 0..<repetitions {
        scaledTimes.append(try milliseconds {
            small = try scaled.decode(data: data, name: name)
            values = preprocessor.pixelValues(for: small)
        })
    }
    var maxAbs: Float = 0, sumAbs: Double = 0
    for i in 0..<values.count {
        let d = abs(values[i] - reference[i])
        maxAbs = max(maxAbs, d)
        sumAbs += Double(d)
    }
    worstMax = max(worstMax, maxAbs)
    let total = median(decodeTimes) + median(preprocessTimes)
    totals.append(total)
    minTotals.append(totalTimes.min()!)
    scaledTotals.append(median(scaledTimes))
    func pad(_ s: String, _ n: Int) -> String { s.count >= n ? s : s + String(repeating: " ", count: n - s.count) }
    func f(_ x: Double, _ digits: Int = 2) -> String { String(format: "%.\(digits)f", x) }
    print(pad(name, 27), pad("\(image.width)x\(image.height)", 9),
          pad(f(median(decodeTimes)), 7), pad(f(median(preprocessTimes)), 11), pad(f(total), 6),
          pad(f(totalTimes.min()!), 6), pad(f(median(literalTimes)), 7), "|",
          pad("\(small.width)x\(small.height)", 7), pad(f(median(scaledTimes)), 6),
          pad(f(total / median(scaledTimes)) + "x", 8), pad(String(format: "%.4f", maxAbs), 8), String(format: "%.5f", sumAbs / Double(values.count)))
}
let mean = totals.reduce(0, +) / Double(totals.count)
let scaledMean = scaledTotals.reduce(0, +) / Double(scaledTotals.count)
print("")
print(String(format: "mean per image: full-size decode + preprocess %.2f ms (mean of medians), %.2f ms (mean of fastest runs)",
             mean, minTotals.reduce(0, +) / Double(minTotals.count)))
print(String(format: "with JPEG decode-time scaling: %.2f ms (%.2fx), not used: see the parity columns", scaledMean, mean / scaledMean))
print(String(format: "worst max |difference| of normalised values caused by JPEG scaling: %.4f (issue bound 0.02)", worstMax))
