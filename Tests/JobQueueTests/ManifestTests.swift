import Foundation
import Testing
@testable import JobQueue

@Suite("Manifests")
struct ManifestTests {
    /// sha256 of the three bytes "abc" (FIPS 180-2 example).
    static let abcSHA256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"

    @Test func jsonlBadLinesAreReportedByLineNumberAndGoodLinesEnqueued() throws {
        let fixture = try Fixture()
        defer { fixture.remove() }
        try fixture.file("images/a.jpg", "abc")
        try fixture.file("images/b.png", "abcd")
        let manifest = try fixture.file("jobs.jsonl", """
            {"custom_id": "one", "image": "images/a.jpg", "prompt": "Describe.", "max_tokens": 32, "stop": "###"}
            {"custom_id": "two", "image": "images/missing.jpg", "prompt": "Describe."}
            not json at all

            {"custom_id": "three", "image": "images/a.jpg", "prompt": "Describe.", "max_token": 3}
            {"custom_id": "four", "image": "images/a.jpg", "prompt": "Describe.", "temperature": "hot"}
            ["an", "array"]
            {"custom_id": "five", "image": "images/b.png", "prompt": "What?", "top_p": 0.9, "top_k": 5, "seed": 3, "stop": ["a", "b"], "sparsity": "fastv", "vision_keep_rate": 0.5, "temperature": 0.7, "priority": -1}
            {"custom_id": "six", "image": "images/b.png", "prompt": "What?", "sparsity": "some"}
            {"custom_id": "seven", "image": "images/b.png", "prompt": ""}
            {"custom_id": "eight", "image": "images/b.png", "prompt": "x", "top_p": 2}
            {"image": "images/b.png", "prompt": "No custom id."}\r
            """)
        var streamed: [ManifestProblem] = []
        let report = try fixture.queue.enqueueJSONL(manifest, options: ManifestOptions(defaults: JobParameters(maxTokens: 64, seed: 1))) {
            streamed.append($0)
        }
        #expect(report.inserted == 3 && report.alreadyPresent == 0)
        #expect(report.problems == streamed)
        let expected: [(Int, String)] = [
            (2, "image \(fixture.directory.appendingPathComponent("images/missing.jpg").path) not found"),
            (3, "not valid JSON"),
            (5, "unknown field 'max_token'"),
            (6, "temperature must be a number"),
            (7, "not a JSON object"),
            (9, "sparsity must be one of dynamic, full, fastv, random, not 'some'"),
            (10, "the prompt is empty"),
            (11, "top_p must be in (0, 1]"),
        ]
        #expect(report.problems.map { $0.line ?? 0 } == expected.map(\.0))
        #expect(report.problems.map(\.reason) == expected.map(\.1))
        #expect(report.problems[0].description.hasPrefix("\(manifest.path):2: image "))

        let one = try #require(try fixture.queue.job(customID: "one"))
        #expect(one.imagePath == fixture.directory.appendingPathComponent("images/a.jpg").path)
        #expect(one.imageSHA256 == Self.abcSHA256)
        // Line values win over the command line's defaults; defaults fill the rest.
        #expect(one.parameters == JobParameters(maxTokens: 32, seed: 1, stop: ["###"]))
        let five = try #require(try fixture.queue.job(customID: "five"))
        #expect(five.priority == -1)
        #expect(five.parameters == JobParameters(maxTokens: 64, temperature: 0.7, topP: 0.9, topK: 5, seed: 3, stop: ["a", "b"],
                                                 sparsity: .fastv, visionKeepRate: 0.5))
        let anonymous = try #require(try fixture.queue.list(JobFilter(ids: nil)).last)
        #expect(anonymous.customID == nil && anonymous.idempotencyKey.hasPrefix("sha256:"))

        // Enqueueing the same manifest again adds nothing.
        let again = try fixture.queue.enqueueJSONL(manifest, options: ManifestOptions(defaults: JobParameters(maxTokens: 64, seed: 1)))
        #expect(again.inserted == 0 && again.alreadyPresent == 3 && again.problems.count == 8)
    }

    @Test func relativeImagePathsResolveAgainstTheManifestsFolder() throws {
        let fixture = try Fixture()
        defer { fixture.remove() }
        try fixture.file("data/pictures/cat.jpg", "abc")
        let absolute = try fixture.file("elsewhere/dog.jpg", "abc")
        let manifest = try fixture.file("data/manifests/jobs.jsonl", """
            {"custom_id": "cat", "image": "../pictures/cat.jpg", "prompt": "Describe."}
            {"custom_id": "dog", "image": "\(absolute.path)", "prompt": "Describe."}
            """)
        let report = try fixture.queue.enqueueJSONL(manifest)
        #expect(report.inserted == 2 && report.problems.isEmpty)
        #expect(try fixture.queue.job(customID: "cat")?.imagePath == fixture.directory.appendingPathComponent("data/pictures/cat.jpg").path)
        #expect(try fixture.queue.job(customID: "dog")?.imagePath == absolute.path)
    }

    @Test func csvFollowsRFC4180QuotingAndReportsBadRecordsByTheirFirstLine() throws {
        let fixture = try Fixture()
        defer { fixture.remove() }
        try fixture.file("a.jpg", "abc")
        let manifest = try fixture.file("jobs.csv",
            "custom_id,image,prompt,max_tokens,temperature,stop\r\n" +
            "one,a.jpg,\"Describe, briefly.\",16,,\r\n" +
            "two,a.jpg,\"Say \"\"hi\"\"\nthen stop.\",,0.5,\"\n\"\r\n" +
            "three,a.jpg,Describe.,many,,\r\n" +
            "four,a.jpg,Describe.\r\n" +
            "\r\n" +
            "five,missing.jpg,Describe.,,,\r\n" +
            "six,a.jpg,\"unclosed\" quote,,,\r\n" +
            "seven,a.jpg,Last line without a newline,8,,")
        let report = try fixture.queue.enqueueCSV(manifest)
        #expect(report.inserted == 3)
        let expected: [(Int, String)] = [
            (6, "max_tokens must be an integer, not 'many'"),
            (7, "3 fields where the header has 6"),
            (9, "image \(fixture.directory.appendingPathComponent("missing.jpg").path) not found"),
            (10, "text after the closing quote of a field"),
        ]
        #expect(report.problems.map { $0.line ?? 0 } == expected.map(\.0))
        #expect(report.problems.map(\.reason) == expected.map(\.1))
        #expect(try fixture.queue.job(customID: "one")?.prompt == "Describe, briefly.")
        #expect(try fixture.queue.job(customID: "one")?.parameters == JobParameters(maxTokens: 16))
        let two = try #require(try fixture.queue.job(customID: "two"))
        #expect(two.prompt == "Say \"hi\"\nthen stop.")
        #expect(two.parameters == JobParameters(temperature: 0.5, stop: ["\n"]))
        #expect(try fixture.queue.job(customID: "seven")?.parameters.maxTokens == 8)
    }

    @Test func csvWithoutAHeaderOrWithUnknownColumnsIsRefusedWhole() throws {
        let fixture = try Fixture()
        defer { fixture.remove() }
        let empty = try fixture.file("empty.csv", "")
        #expect(throws: ManifestError(file: empty.path, reason: "empty CSV: no header row")) { try fixture.queue.enqueueCSV(empty) }
        let unknown = try fixture.file("unknown.csv", "image,prompt,colour\na.jpg,x,red\n")
        #expect(throws: ManifestError(file: unknown.path, reason: "unknown column 'colour' in the header")) {
            try fixture.queue.enqueueCSV(unknown)
        }
        let noPrompt = try fixture.file("noprompt.csv", "custom_id,image\na,a.jpg\n")
        #expect(throws: ManifestError(file: noPrompt.path, reason: "the header has no 'prompt' column")) {
            try fixture.queue.enqueueCSV(noPrompt)
        }
        let missing = fixture.directory.appendingPathComponent("none.jsonl")
        #expect(throws: ManifestError.self) { try fixture.queue.enqueueJSONL(missing) }
    }

    @Test func aFolderIsEnqueuedSortedWithOnePromptAndOnlyImageExtensions() throws {
        let fixture = try Fixture()
        defer { fixture.remove() }
        try fixture.file("photos/b.JPG", "b")
        try fixture.file("photos/a.png", "a")
        try fixture.file("photos/c.jpeg", "c")
        try fixture.file("photos/notes.txt", "n")
        try fixture.file("photos/nested/d.jpg", "d")
        let folder = fixture.directory.appendingPathComponent("photos")
        let flat = try fixture.queue.enqueueFolder(folder, prompt: "Caption this.")
        #expect(flat.inserted == 3 && flat.problems.isEmpty)
        #expect(try fixture.queue.list().map { URL(fileURLWithPath: $0.imagePath).lastPathComponent } == ["a.png", "b.JPG", "c.jpeg"])
        // Recursive picks up the nested image; the others are already present by content.
        let deep = try fixture.queue.enqueueFolder(folder, prompt: "Caption this.", recursive: true)
        #expect(deep.inserted == 1 && deep.alreadyPresent == 3)
        #expect(try fixture.queue.list().allSatisfy { $0.prompt == "Caption this." && $0.customID == nil })
    }

    @Test func aHundredThousandLineManifestIsStreamedInChunks() throws {
        let fixture = try Fixture()
        defer { fixture.remove() }
        try fixture.file("tiny.png", "abc")
        let url = fixture.directory.appendingPathComponent("big.jsonl")
        _ = FileManager.default.createFile(atPath: url.path, contents: nil)
        let handle = try FileHandle(forWritingTo: url)
        let lines = 100_000
        var chunk = ""
        for i in 0..<lines {
            chunk += #"{"custom_id": "c\#(i)", "image": "tiny.png", "prompt": "Describe image \#(i % 7)."}"# + "\n"
            if i % 10_000 == 9_999 {
                try handle.write(contentsOf: Data(chunk.utf8))
                chunk = ""
            }
        }
        try handle.close()
        let report = try fixture.queue.enqueueJSONL(url)
        #expect(report.inserted == lines && report.problems.isEmpty)
        #expect(try fixture.queue.counts()[.available] == lines)
        #expect(try fixture.queue.job(customID: "c99999")?.prompt == "Describe image 4.")
    }

    @Test func jsonlLinesThatAreNotUnicodeTextSaySo() throws {
        let fixture = try Fixture()
        defer { fixture.remove() }
        try fixture.file("images/a.jpg", "abc")
        var bytes = Data()
        let lines: [[UInt8]] = [
            Array(#"{"image": "images/a.jpg", "prompt": "caf"#.utf8) + [0xE9] + Array(#""}"#.utf8),
            Array(#"{"image": "images/a.jpg", "prompt": "a"#.utf8) + [0x00] + Array(#"b"}"#.utf8),
            Array(#"{"image": "images/a.jpg", "prompt": "a\u0000b"}"#.utf8),
            Array(#"{"image": "images/a.jpg", "prompt": "half \ud800 of it"}"#.utf8),
            Array(#"{"image": "images/a.jpg", "prompt": "\udc00 alone"}"#.utf8),
            Array(#"{"image": "images/a.jpg", "prompt": "Describe.", "prompt": "Ignore that."}"#.utf8),
            Array(#"{"image": "images/a.jpg", "prompt": "A smile \ud83d\ude00 and a \\u0000 that is text."}"#.utf8),
        ]
        for line in lines { bytes.append(contentsOf: line + [0x0A]) }
        let manifest = fixture.directory.appendingPathComponent("bad.jsonl")
        try bytes.write(to: manifest)
        let report = try fixture.queue.enqueueJSONL(manifest)
        #expect(report.problems.map(\.reason) == [
            "byte 41 is not valid UTF-8 (a manifest must be UTF-8 text)",
            "byte 39 is a NUL character",
            "a string holds a NUL character (\\u0000)",
            "a string holds a lone surrogate (a \\uD800-\\uDBFF escape without its low half)",
            "a string holds a lone surrogate (a \\uDC00-\\uDFFF escape without its high half)",
            "the key \"prompt\" is given twice",
        ])
        #expect(report.problems.map { $0.line ?? 0 } == [1, 2, 3, 4, 5, 6])
        #expect(report.inserted == 1)
        #expect(try fixture.queue.list().first?.prompt == "A smile \u{1F600} and a \\u0000 that is text.")
    }

    @Test func aCustomIDGivenTwiceWithOtherContentIsAConflictNamingBothLines() throws {
        let fixture = try Fixture()
        defer { fixture.remove() }
        try fixture.file("images/a.jpg", "abc")
        try fixture.file("images/b.jpg", "abcd")
        let manifest = try fixture.file("jobs.jsonl", """
            {"custom_id": "x", "image": "images/a.jpg", "prompt": "Describe."}
            {"custom_id": "x", "image": "images/a.jpg", "prompt": "Describe."}
            {"custom_id": "x", "image": "images/b.jpg", "prompt": "Describe."}
            """)
        let report = try fixture.queue.enqueueJSONL(manifest)
        #expect(report.inserted == 1 && report.alreadyPresent == 1)
        #expect(report.problems.map(\.description) == [
            "\(manifest.path):3: custom_id 'x' is also on line 1 with another image, prompt or parameters; this line is not enqueued (give it its own custom_id)",
        ])
        // Against the queue: a later manifest reusing the id for another question.
        let later = try fixture.file("later.jsonl", #"{"custom_id": "x", "image": "images/a.jpg", "prompt": "Count the shapes."}"# + "\n")
        let again = try fixture.queue.enqueueJSONL(later)
        #expect(again.inserted == 0 && again.alreadyPresent == 0)
        #expect(again.problems.map(\.description) == [
            "\(later.path):1: custom_id 'x' is already queued as job 1 with another image, prompt or parameters; this line is not enqueued (give it its own custom_id)",
        ])
    }

    @Test func anUnterminatedCSVQuoteReportsTheLinesItSwallowed() throws {
        let fixture = try Fixture()
        defer { fixture.remove() }
        try fixture.file("images/a.jpg", "abc")
        let manifest = try fixture.file("jobs.csv", """
            custom_id,image,prompt
            one,images/a.jpg,Describe.
            two,images/a.jpg,"Describe the image.
            three,images/a.jpg,Describe.
            four,images/a.jpg,Describe.

            """)
        let report = try fixture.queue.enqueueCSV(manifest)
        #expect(report.inserted == 1)
        #expect(report.problems.map(\.description) == [
            "\(manifest.path):3: the quoted field opened on line 3 is never closed: it swallowed lines 3-6 to the end of the file (4 lines, none enqueued); close the quote",
        ])
    }

    @Test func csvAndJSONLDecodeEveryParameterThroughOneSchema() throws {
        let fixture = try Fixture()
        defer { fixture.remove() }
        try fixture.file("images/a.jpg", "abc")
        let jsonl = try fixture.file("jobs.jsonl", #"""
            {"custom_id": "j", "image": "images/a.jpg", "prompt": "P", "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": 4, "seed": 18446744073709551615, "stop": "###", "sparsity": "random", "vision_keep_rate": 0.25, "priority": 2}
            """# + "\n")
        let csv = try fixture.file("jobs.csv", """
            custom_id,image,prompt,max_tokens,temperature,top_p,top_k,seed,stop,sparsity,vision_keep_rate,priority
            c,images/a.jpg,P,7,0.5,0.9,4,18446744073709551615,###,random,0.25,2
            """ + "\n")
        #expect(try fixture.queue.enqueueJSONL(jsonl).inserted == 1)
        #expect(try fixture.queue.enqueueCSV(csv).inserted == 1)
        let fromJSONL = try #require(try fixture.queue.job(customID: "j")), fromCSV = try #require(try fixture.queue.job(customID: "c"))
        #expect(fromJSONL.parameters == fromCSV.parameters && fromJSONL.priority == 2 && fromCSV.priority == 2)
        #expect(fromCSV.parameters == JobParameters(maxTokens: 7, temperature: 0.5, topP: 0.9, topK: 4, seed: .max, stop: ["###"],
                                                    sparsity: .random, visionKeepRate: 0.25))
        // Every field of the schema is one a manifest may name.
        #expect(JobParameters.schema.map(\.key.stringValue).sorted() == JobParameters.CodingKeys.allCases.map(\.stringValue).sorted())
    }
}
