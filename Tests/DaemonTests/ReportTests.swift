// `dllava report` and `generate --kept-patches` on real runs of the shipped model: the kept image indices travel
// from the engine through the result file to the page.
import Artifacts
import CommandLineSupport
import Foundation
import Testing

/// The JSON document a report page carries.
func reportData(_ html: String) throws -> [String: Any] {
    let start = try #require(html.range(of: #"<script type="application/json" id="report-data">"#))
    let end = try #require(html.range(of: "</script>", range: start.upperBound ..< html.endIndex))
    return try #require(try JSONSerialization.jsonObject(with: Data(html[start.upperBound ..< end.lowerBound].utf8)) as? [String: Any])
}

/// Width and height from a PNG's IHDR chunk.
func pngSize(_ data: Data) throws -> (Int, Int) {
    try #require(data.count > 24 && data.prefix(8) == Data([0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A]))
    let bytes = [UInt8](data[16 ..< 24])
    func be(_ i: Int) -> Int { bytes[i ..< i + 4].reduce(0) { $0 << 8 | Int($1) } }
    return (be(0), be(4))
}

@Suite("dllava report and generate --kept-patches", .serialized)
struct ReportTests {
    @Test("the report shows each job's caption, its kept patches, the failed job's error and the totals")
    func reportOfARun() throws {
        let directory = try workspace(jobs: [("a", sample("test_000004.png"), "Describe the image."),
                                             ("b", sample("test_000008.png"), "Describe the image."),
                                             ("broken", badImage, "Describe the image.")])
        defer { try? FileManager.default.removeItem(at: directory) }
        #expect(try run(["run", "--db", "q.sqlite", "--model", model, "--out", "out", "--until-empty"], in: directory).status == 0)
        // The result file keeps the kept indices, as many as the image tokens kept.
        let resultURL = try queueOutput(directory).appendingPathComponent("1-1.json.zst")
        let json = try Zstd.decompress(try Data(contentsOf: resultURL), maxSize: 1 << 24)
        let record = try #require(try JSONSerialization.jsonObject(with: json) as? [String: Any])
        let stats = try #require(record["stats"] as? [String: Any])
        let kept = try #require(stats["kept_image_indices"] as? [Int])
        #expect(record["format_version"] as? Int == 3 && kept.count == stats["image_tokens_kept"] as? Int && kept == kept.sorted())

        let report = try run(["report", "--db", "q.sqlite", "--output", "report.html", "--title", "Scenes"], in: directory)
        #expect(report.status == 0, "\(report.standardError)")
        #expect(report.standardOutput.hasPrefix("wrote report.html: 3 jobs, "))
        let html = try String(contentsOf: directory.appendingPathComponent("report.html"), encoding: .utf8)
        #expect(html.contains("<title>Scenes</title>") && !html.contains("http://") && !html.contains("https://"))
        let data = try reportData(html)
        let jobs = try #require(data["jobs"] as? [[String: Any]])
        let exported = try export(directory)
        #expect(jobs.count == 3)
        for job in jobs.prefix(2) {
            let id = try #require(job["custom_id"] as? String)
            #expect(job["text"] as? String == exported[id]?["text"] as? String && (job["text"] as? String)?.isEmpty == false)
            #expect(job["patches_drawn"] as? Bool == true && job["image_tokens_total"] as? Int == 144)
            #expect((job["thumbnail"] as? String)?.hasPrefix("data:image/jpeg;base64,/9j/") == true)
        }
        #expect(jobs[2]["state"] as? String == "failed" && (jobs[2]["error"] as? String)?.contains("bad_truncated.jpg") == true)
        #expect(jobs[2]["thumbnail"] == nil && (jobs[2]["thumbnail_note"] as? String)?.contains("bad_truncated.jpg") == true)
        let totals = try #require(data["totals"] as? [String: Any])
        #expect(totals["jobs"] as? Int == 3 && (totals["states"] as? [String: Int]) == ["succeeded": 2, "failed": 1])
        #expect(html.contains("<svg viewBox=") && html.contains("<rect "))

        // The report refuses to overwrite the queue.
        #expect(try run(["report", "--db", "q.sqlite", "--output", "q.sqlite"], in: directory).status == 64)
    }

    @Test("generate --kept-patches writes the model's view of the image with the dropped patches darkened")
    func keptPatchesImage() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("dllava-kept-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        var images: [String: Data] = [:]
        for sparsity in ["dynamic", "full"] {
            let result = try run(["generate", "--model", model, "--image", sample("test_000004.png"), "--prompt", "Describe the image.",
                                  "--max-tokens", "8", "--sparsity", sparsity, "--kept-patches", "\(sparsity).png"], in: directory)
            #expect(result.status == 0, "\(result.standardError)")
            images[sparsity] = try Data(contentsOf: directory.appendingPathComponent("\(sparsity).png"))
        }
        #expect(try pngSize(images["dynamic"]!) == (336, 336) && pngSize(images["full"]!) == (336, 336))
        #expect(images["dynamic"] != images["full"])
        // Without an image there is nothing to draw on.
        #expect(try run(["generate", "--model", model, "--prompt", "Hi", "--kept-patches", "x.png"], in: directory).status == 64)
    }
}
