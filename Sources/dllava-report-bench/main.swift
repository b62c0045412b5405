// `dllava report` at scale: a queue of N succeeded jobs (the sample images, captions and kept image indices as a
// Dynamic-LLaVA run records them; no model runs), then the report built from it, timed, with the page's size. Not a
// test: it asserts nothing and prints what this machine does. Scripts/report-check opens the page in Chromium.
//
//   swift build -c release --product dllava-report-bench
//   .build/release/dllava-report-bench --jobs 10000 --images Jobs/samples --output /tmp/report-10000.html
import ArgumentParser
import Artifacts
import Foundation
import JobQueue
import RunReport

@main
struct ReportBenchmark: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dllava-report-bench", abstract: "Time `dllava report` on a queue of many succeeded jobs and print the page's size.")

    @Option(help: "Jobs in the queue.")
    var jobs = 10_000

    @Option(help: "A folder of PNG or JPEG images the jobs cycle through.")
    var images: String

    @Option(help: "Where the report goes.")
    var output: String

    @Option(help: "Image tokens per image (a square number) and how many each job keeps.")
    var imageTokens = 144
    @Option(help: "Image tokens each job keeps.")
    var kept = 28

    struct Stats: Codable {
        var image_tokens_total: Int
        var image_tokens_kept: Int
        var kept_image_indices: [Int]
        var prefill_ms: Double
        var decode_ms: Double
    }

    func run() throws {
        let folder = FileManager.default.temporaryDirectory.appendingPathComponent("dllava-report-bench-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: folder) }
        let names = try FileManager.default.contentsOfDirectory(atPath: images).filter { $0.hasSuffix(".png") || $0.hasSuffix(".jpg") }.sorted()
        guard !names.isEmpty else { throw ValidationError("no PNG or JPEG images in \(images)") }
        let imagePaths = names.map { URL(fileURLWithPath: images).appendingPathComponent($0).standardizedFileURL.path }
        let hashes = try imagePaths.map { try Checksum.sha256Hex(fileAt: URL(fileURLWithPath: $0)) }

        let setupStart = Date()
        let queue = try SQLiteJobQueue(path: folder.appendingPathComponent("q.sqlite").path, create: true)
        _ = try queue.enqueue((0..<jobs).map { i in
            NewJob(customID: "job-\(i)", imagePath: imagePaths[i % imagePaths.count], imageSHA256: hashes[i % hashes.count], prompt: "Describe the image.")
        })
        let results = try ResultFile(directory: folder.appendingPathComponent("out"))
        var generator = SystemRandomNumberGenerator()
        var completed = 0
        while completed < jobs {
            for job in try queue.claim(owner: "bench", limit: 500, leaseDuration: 600_000) {
                let keptIndices = Array((0..<imageTokens).shuffled(using: &generator).prefix(kept)).sorted()
                let record = ResultRecord(queueID: queue.identity, jobID: job.id, attempt: job.attempt, customID: job.customID,
                                          text: "There are \(job.id % 4 + 1) shapes: a small blue circle at the top, a large red square at the bottom left.",
                                          tokenIDs: Array(repeating: 1, count: 24), finishReason: "stop", parameters: job.parameters,
                                          stats: Stats(image_tokens_total: imageTokens, image_tokens_kept: kept, kept_image_indices: keptIndices,
                                                       prefill_ms: 120, decode_ms: 480),
                                          model: ModelFingerprint(fingerprint: "bench"), timings: ResultTimings(startedAt: 0, finishedAt: 1))
                let written = try results.write(record)
                _ = try queue.complete(job: job.id, attempt: job.attempt, owner: "bench",
                                       output: JobOutput(path: written.url.path, sha256: written.sha256))
                completed += 1
            }
        }
        print("machine: \(ProcessInfo.processInfo.activeProcessorCount) cores; \(jobs) succeeded jobs over \(imagePaths.count) images "
              + String(format: "(queue and result files made in %.1f s)", Date().timeIntervalSince(setupStart)))

        let buildStart = Date()
        let report = try RunReport.build(from: queue, title: "dllava report benchmark: \(jobs) jobs")
        let built = Date().timeIntervalSince(buildStart)
        let writeStart = Date()
        let written = try AtomicFile.write(Data(report.html().utf8), to: URL(fileURLWithPath: output))
        print(String(format: "report: read and thumbnailed in %.1f s (%.2f ms a job), HTML written in %.1f s; %@: %.1f MB (%.1f KB a job)",
                     built, built * 1000 / Double(jobs), Date().timeIntervalSince(writeStart), output,
                     Double(written.bytes) / 1e6, Double(written.bytes) / 1e3 / Double(jobs)))
    }
}
