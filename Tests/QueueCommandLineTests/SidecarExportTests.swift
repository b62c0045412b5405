// `dllava export --format sidecar`: caption files beside the images or in a mirrored tree, never replacing a file
// without --overwrite, and saying what it skipped.
import Artifacts
import CommandLineSupport
import Foundation
import JobQueue
import Testing

@Suite("dllava export --format sidecar")
struct SidecarExportTests {
    /// A queue with four jobs: `a` (images/x/a.jpg) and `b` (images/y/b.png) succeed, `again` (images/x/a.jpg with
    /// another prompt) succeeds too, and `bad` (images/y/bad.jpg) fails.
    func captionedQueue() throws -> Workspace {
        let workspace = try Workspace()
        #expect(try workspace.queue("init").status == 0)
        for name in ["images/x/a.jpg", "images/y/b.png", "images/y/bad.jpg"] { try workspace.file(name, "bytes of \(name)") }
        let manifest = try workspace.file("jobs.jsonl", """
            {"custom_id": "a", "image": "images/x/a.jpg", "prompt": "Describe."}
            {"custom_id": "b", "image": "images/y/b.png", "prompt": "Describe."}
            {"custom_id": "again", "image": "images/x/a.jpg", "prompt": "Describe briefly."}
            {"custom_id": "bad", "image": "images/y/bad.jpg", "prompt": "Describe."}
            """)
        #expect(try workspace.queue("enqueue", "--jsonl", manifest.path).status == 0)
        let queue = try SQLiteJobQueue(path: workspace.database)
        let results = try ResultFile(directory: workspace.directory.appendingPathComponent("out"))
        let captions = ["a": "A red circle,\nand a square.", "b": "Two blue triangles.", "again": "A circle."]
        for job in try queue.claim(owner: "test", limit: 4, leaseDuration: 60_000) {
            guard let caption = captions[job.customID ?? ""] else {
                _ = try queue.fail(job: job.id, attempt: job.attempt, owner: "test", error: "not a JPEG", permanent: true)
                continue
            }
            let record = ResultRecord(queueID: queue.identity, jobID: job.id, attempt: job.attempt, customID: job.customID, text: caption,
                                      tokenIDs: [1], finishReason: "stop", parameters: job.parameters, stats: Stats(decode_ms: 1),
                                      model: ModelFingerprint(fingerprint: "f"), timings: ResultTimings(startedAt: 1, finishedAt: 2))
            let written = try results.write(record)
            #expect(try queue.complete(job: job.id, attempt: job.attempt, owner: "test", output: JobOutput(path: written.url.path, sha256: written.sha256)))
        }
        return workspace
    }

    func contents(_ workspace: Workspace, _ name: String) -> String? {
        try? String(contentsOf: workspace.directory.appendingPathComponent(name), encoding: .utf8)
    }

    @Test func captionFilesGoBesideTheImagesAndAnExistingOneIsSkippedUntilOverwrite() throws {
        let workspace = try captionedQueue()
        defer { workspace.remove() }
        try workspace.file("images/y/b.txt", "my own caption")

        let first = try workspace.queue("export", "--format", "sidecar")
        #expect(first.status == 0, "\(first.standardError)")
        #expect(contents(workspace, "images/x/a.txt") == "A red circle,\nand a square.")
        #expect(contents(workspace, "images/y/b.txt") == "my own caption")
        #expect(contents(workspace, "images/y/bad.txt") == nil)
        #expect(first.standardOutput == "wrote 1 caption file; skipped 2\n")
        let b = workspace.directory.appendingPathComponent("images/y/b.txt").standardizedFileURL.path
        let a = workspace.directory.appendingPathComponent("images/x/a.txt").standardizedFileURL.path
        #expect(first.errorLines == [
            "dllava: skipped job 2: \(b): it exists (--overwrite replaces it)",
            "dllava: skipped job 3: \(a): job 1 of this export wrote it (the same image)",
        ])
        // No temporary file is left beside the captions.
        #expect(try FileManager.default.contentsOfDirectory(atPath: workspace.directory.appendingPathComponent("images/x").path).sorted() == ["a.jpg", "a.txt"])

        let again = try workspace.queue("export", "--format", "sidecar")
        #expect(again.status == 0 && again.standardOutput == "wrote 0 caption files; skipped 3\n")

        let overwrite = try workspace.queue("export", "--format", "sidecar", "--overwrite")
        #expect(overwrite.status == 0 && overwrite.standardOutput == "wrote 2 caption files; skipped 1\n")
        #expect(contents(workspace, "images/y/b.txt") == "Two blue triangles.")
    }

    @Test func intoAFolderMirrorsTheImageTreeWithTheChosenExtension() throws {
        let workspace = try captionedQueue()
        defer { workspace.remove() }
        let result = try workspace.queue("export", "--format", "sidecar", "--into", "captions", "--extension", ".caption")
        #expect(result.status == 0, "\(result.standardError)")
        #expect(contents(workspace, "captions/x/a.caption") == "A red circle,\nand a square.")
        #expect(contents(workspace, "captions/y/b.caption") == "Two blue triangles.")
        #expect(contents(workspace, "images/x/a.caption") == nil)
        #expect(result.standardOutput == "wrote 2 caption files; skipped 1\n")
    }

    @Test func anUnreadableResultIsReportedWith65AndTheOtherCaptionsAreWritten() throws {
        let workspace = try captionedQueue()
        defer { workspace.remove() }
        let queue = try SQLiteJobQueue(path: workspace.database)
        let b = try #require(try queue.job(customID: "b"))
        try Data("tampered".utf8).write(to: URL(fileURLWithPath: try #require(b.outputPath)))
        let result = try workspace.queue("export", "--format", "sidecar", "--into", "captions")
        #expect(result.status == 65)
        #expect(contents(workspace, "captions/x/a.txt") == "A red circle,\nand a square.")
        #expect(contents(workspace, "captions/y/b.txt") == nil)
        #expect(result.errorLines.first?.hasPrefix("dllava: job \(b.id): ") == true)
        #expect(result.errorLines.last?.contains("1 result file could not be read") == true)
    }

    @Test func sidecarOptionsAreCheckedBeforeAnythingIsWritten() throws {
        let workspace = try captionedQueue()
        defer { workspace.remove() }
        for arguments in [["--output", "x.jsonl"], ["--extension", "txt"], ["--extension", "./a"], ["--state", "failed"]] {
            let result = try workspace.run(["export", "--db", workspace.database, "--format", "sidecar"] + arguments)
            #expect(result.status == 64, "\(arguments)")
        }
        #expect(try workspace.queue("export", "--format", "jsonl", "--output", "-", "--overwrite").status == 64)
        #expect(try workspace.queue("export", "--format", "csv").status == 64)
        #expect(contents(workspace, "images/x/a.txt") == nil)
    }

    @Test func intoRefusesASymlinkedFolderThatLeadsOutOfTheTreeAndWritesNothing() throws {
        let workspace = try captionedQueue()
        defer { workspace.remove() }
        let outside = workspace.directory.appendingPathComponent("outside")
        try FileManager.default.createDirectory(at: outside, withIntermediateDirectories: true)
        try FileManager.default.createDirectory(at: workspace.directory.appendingPathComponent("captions"), withIntermediateDirectories: true)
        let link = workspace.directory.appendingPathComponent("captions/x").path
        #expect(symlink(outside.path, link) == 0)
        for overwrite in [[], ["--overwrite"]] {
            let result = try workspace.run(["export", "--db", workspace.database, "--format", "sidecar", "--into", "captions"] + overwrite)
            #expect(result.status == 64, "\(result.standardError)")
            #expect(result.errorLines == ["dllava: \(link) is a symbolic link inside --into \(workspace.directory.appendingPathComponent("captions").path); "
                                          + "sidecars are not written through links, which could lead out of that folder; nothing was written there"],
                    "\(result.standardError)")
        }
        #expect(try FileManager.default.contentsOfDirectory(atPath: outside.path).isEmpty)
        // Nothing at all: not even the captions of the folder without a link.
        #expect(contents(workspace, "captions/y/b.txt") == nil)
    }

    @Test func overwriteRefusesAFIFOInACaptionsPlaceBeforeWritingAny() throws {
        let workspace = try captionedQueue()
        defer { workspace.remove() }
        let fifo = workspace.directory.appendingPathComponent("images/y/b.txt").path
        #expect(mkfifo(fifo, 0o644) == 0)
        let result = try workspace.queue("export", "--format", "sidecar", "--overwrite")
        #expect(result.status == 64, "\(result.standardError)")
        #expect(result.errorLines == ["dllava: \(fifo) is a FIFO, not a regular file; nothing was written there"], "\(result.standardError)")
        #expect(contents(workspace, "images/x/a.txt") == nil)
        var status = stat()
        #expect(lstat(fifo, &status) == 0 && status.st_mode & S_IFMT == S_IFIFO)
    }
}
