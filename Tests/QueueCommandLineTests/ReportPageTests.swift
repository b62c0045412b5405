// `dllava report` without a model: the page parsed by a real HTML5 parser (html5lib, Debian's python3-html5lib,
// installed by Scripts/setup) whatever the jobs' texts hold, results read where export reads them, a report whose
// results cannot be read exits 65, and an image replaced since its job ran is not drawn with that job's patches.
import Artifacts
import CommandLineSupport
import Foundation
import JobQueue
import Testing

/// The stats a report draws kept patches from.
struct KeptStats: Codable, Sendable {
    var image_tokens_total: Int
    var image_tokens_kept: Int
    var kept_image_indices: [Int]
}

/// Parses the page at `path` with html5lib as a browser's parser would (the WHATWG tokenizer, script-data states
/// included): every `<script>` element's id and text, and the ids of the `<main>` elements.
func parseReportPage(_ path: String) throws -> (scripts: [(id: String?, text: String)], mainIDs: [String?]) {
    let program = """
        import html5lib, json, sys
        with open(sys.argv[1], "rb") as page:
            document = html5lib.parse(page, transport_encoding="utf-8", namespaceHTMLElements=False)
        json.dump({"scripts": [{"id": s.get("id"), "text": s.text or ""} for s in document.iter("script")],
                   "main": [m.get("id") for m in document.iter("main")]}, sys.stdout)
        """
    // Debian's Python, where python3-html5lib installs.
    let parsed = try runProgram(URL(fileURLWithPath: "/usr/bin/python3"), ["-c", program, path])
    try #require(parsed.status == 0, "html5lib failed (Scripts/setup installs python3-html5lib): \(parsed.standardError)")
    let object = try #require(try JSONSerialization.jsonObject(with: Data(parsed.standardOutput.utf8)) as? [String: Any])
    let scripts = try #require(object["scripts"] as? [[String: Any]]).map { ($0["id"] as? String, $0["text"] as? String ?? "") }
    return (scripts, try #require(object["main"] as? [Any]).map { $0 as? String })
}

/// The directory of the shared test images.
let fixtureImages = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("Fixtures/images")

@Suite("dllava report pages")
struct ReportPageTests {
    static let payloads = ["</script>", "<!--<script>", "<![CDATA[", "]]>", "\u{202E}gnp.exe\u{202C}", "line\u{2028}break\u{2029}paragraph",
                           "<script>alert(1)</script>", "&lt;&amp;", "--><!--", "</SCRIPT >", "\\u003c/script>"]

    /// Completes `job` with a result file under `folder` holding `caption` (and kept patches when given).
    func complete(_ job: Job, in queue: SQLiteJobQueue, results: ResultFile, caption: String, stats: KeptStats? = nil) throws {
        let record = ResultRecord(queueID: queue.identity, jobID: job.id, attempt: job.attempt, customID: job.customID, text: caption,
                                  tokenIDs: [1, 2], finishReason: "stop", parameters: job.parameters,
                                  stats: stats ?? KeptStats(image_tokens_total: 0, image_tokens_kept: 0, kept_image_indices: []),
                                  model: ModelFingerprint(fingerprint: "f"), timings: ResultTimings(startedAt: 1, finishedAt: 2))
        let written = try results.write(record)
        #expect(try queue.complete(job: job.id, attempt: job.attempt, owner: "test", output: JobOutput(path: written.url.path, sha256: written.sha256)))
    }

    @Test func everyJobIsOnThePageWhateverItsIdsPromptsImagePathsCaptionsAndErrorsHold() throws {
        let workspace = try Workspace()
        defer { workspace.remove() }
        #expect(try workspace.queue("init").status == 0)
        var lines: [String] = []
        var jobs: [(id: String, prompt: String, image: String)] = []
        for (index, payload) in Self.payloads.enumerated() {
            for outcome in ["ok", "failed"] {
                jobs.append(("\(index) \(outcome) \(payload)", "Describe \(payload) (\(index) \(outcome))", "images/\(index)\(payload)/\(outcome).jpg"))
            }
        }
        jobs.append((String(repeating: "x", count: 20_000 - 12) + "<!--<script>", "Describe.", "images/long.jpg"))
        for job in jobs {
            try workspace.file(job.image, "not an image: \(job.image)")
            let line = try JSONSerialization.data(withJSONObject: ["custom_id": job.id, "prompt": job.prompt, "image": job.image])
            lines.append(String(decoding: line, as: UTF8.self))
        }
        let manifest = try workspace.file("jobs.jsonl", lines.joined(separator: "\n"))
        let enqueued = try workspace.queue("enqueue", "--jsonl", manifest.path)
        #expect(enqueued.status == 0, "\(enqueued.standardError)")

        let queue = try SQLiteJobQueue(path: workspace.database)
        let results = try ResultFile(directory: workspace.directory.appendingPathComponent("out"))
        for job in try queue.claim(owner: "test", limit: jobs.count, leaseDuration: 60_000) {
            let id = try #require(job.customID)
            if id.contains(" failed ") {
                _ = try queue.fail(job: job.id, attempt: job.attempt, owner: "test", error: "Error: \(id)", permanent: true)
            } else {
                try complete(job, in: queue, results: results, caption: "Caption: \(id)")
            }
        }

        let report = try workspace.queue("report", "--output", "report.html")
        #expect(report.status == 0, "\(report.standardError)")
        let path = workspace.directory.appendingPathComponent("report.html").path
        let html = try String(contentsOfFile: path, encoding: .utf8)
        // Valid JavaScript too: no raw line or paragraph separator.
        #expect(!html.contains("\u{2028}") && !html.contains("\u{2029}"))
        let page = try parseReportPage(path)
        // The data element, then the page's own script: neither swallowed the other.
        try #require(page.scripts.count == 2, "\(page.scripts.map { $0.text.prefix(200) })")
        #expect(page.scripts[0].id == "report-data" && page.scripts[1].id == nil)
        #expect(page.scripts[1].text.hasPrefix("const data = JSON.parse(document.getElementById('report-data').textContent);"))
        #expect(page.mainIDs == ["jobs"])
        // What the page's script reads: every job, every text exactly as the queue holds it.
        let data = try #require(try JSONSerialization.jsonObject(with: Data(page.scripts[0].text.utf8)) as? [String: Any])
        let shown = try #require(data["jobs"] as? [[String: Any]])
        var expected: [Job] = []
        try queue.forEach(.all) { expected.append($0) }
        #expect(shown.count == jobs.count && expected.count == jobs.count)
        for (job, entry) in zip(expected, shown) {
            #expect(entry["custom_id"] as? String == job.customID && entry["prompt"] as? String == job.prompt)
            #expect(entry["image"] as? String == job.imagePath)
            if job.state == .succeeded {
                #expect(entry["text"] as? String == "Caption: \(job.customID!)")
            } else {
                #expect(entry["error"] as? String == job.error && job.error?.hasPrefix("Error: ") == true)
            }
            #expect((entry["thumbnail_note"] as? String)?.contains(job.imagePath) == true)
        }
    }

    @Test func aReportWhoseResultsCannotBeReadIsWrittenAndExits65() throws {
        let workspace = try Workspace()
        defer { workspace.remove() }
        #expect(try workspace.queue("init").status == 0)
        _ = try workspace.queue("enqueue", "--jsonl", workspace.standardManifest().path)
        let queue = try SQLiteJobQueue(path: workspace.database)
        let results = try ResultFile(directory: workspace.directory.appendingPathComponent("out"))
        for job in try queue.claim(owner: "test", limit: 3, leaseDuration: 60_000) {
            try complete(job, in: queue, results: results, caption: "caption \(job.customID!)")
        }
        let b = try #require(try queue.job(customID: "b"))
        try Data("tampered".utf8).write(to: URL(fileURLWithPath: try #require(b.outputPath)))
        let report = try workspace.queue("report", "--output", "report.html")
        #expect(report.status == 65, "\(report.standardError)")
        try #require(report.errorLines.count == 2, "\(report.standardError)")
        #expect(report.errorLines[0].hasPrefix("dllava: job \(b.id): the result cannot be read: "), "\(report.standardError)")
        #expect(report.errorLines[1] == "dllava: 1 result could not be read (see above); the report shows the error on its job, without caption")
        let page = try parseReportPage(workspace.directory.appendingPathComponent("report.html").path)
        let data = try #require(try JSONSerialization.jsonObject(with: Data(page.scripts[0].text.utf8)) as? [String: Any])
        let shown = try #require(data["jobs"] as? [[String: Any]])
        #expect(shown.map { $0["text"] as? String } == ["caption a", nil, "caption c"])
        #expect((shown[1]["error"] as? String)?.contains(b.outputPath!) == true && shown[1]["result_unreadable"] as? Bool == true)
    }

    @Test func anImageReplacedSinceItsJobRanIsNotDrawnWithThatJobsPatches() throws {
        let workspace = try Workspace()
        defer { workspace.remove() }
        #expect(try workspace.queue("init").status == 0)
        let image = workspace.directory.appendingPathComponent("photo.png")
        try FileManager.default.copyItem(at: fixtureImages.appendingPathComponent("astronaut.png"), to: image)
        try workspace.file("jobs.jsonl", #"{"custom_id": "photo", "image": "photo.png", "prompt": "Describe."}"#)
        #expect(try workspace.queue("enqueue", "--jsonl", "jobs.jsonl").status == 0)
        let queue = try SQLiteJobQueue(path: workspace.database)
        let results = try ResultFile(directory: workspace.directory.appendingPathComponent("out"))
        let job = try #require(try queue.claim(owner: "test", limit: 1, leaseDuration: 60_000).first)
        try complete(job, in: queue, results: results, caption: "An astronaut.",
                     stats: KeptStats(image_tokens_total: 576, image_tokens_kept: 3, kept_image_indices: [0, 10, 100]))

        func shownJob() throws -> [String: Any] {
            let report = try workspace.queue("report", "--output", "report.html")
            #expect(report.status == 0, "\(report.standardError)")
            let page = try parseReportPage(workspace.directory.appendingPathComponent("report.html").path)
            let data = try #require(try JSONSerialization.jsonObject(with: Data(page.scripts[0].text.utf8)) as? [String: Any])
            return try #require((data["jobs"] as? [[String: Any]])?.first)
        }
        let before = try shownJob()
        #expect(before["patches_drawn"] as? Bool == true && (before["thumbnail"] as? String)?.hasPrefix("data:image/jpeg;base64,") == true)

        try Data(contentsOf: fixtureImages.appendingPathComponent("camera.png")).write(to: image)
        let after = try shownJob()
        #expect(after["patches_drawn"] as? Bool == false && after["thumbnail"] == nil)
        let note = try #require(after["thumbnail_note"] as? String)
        #expect(note.hasPrefix("image changed since the job ran: \(job.imagePath) has sha256 ") && note.hasSuffix("the job recorded \(job.imageSHA256)"))
        #expect(after["text"] as? String == "An astronaut.")
    }
}
