import Foundation
import Testing
@testable import Artifacts

func temporaryDirectory() throws -> URL {
    let url = FileManager.default.temporaryDirectory.appendingPathComponent("dllava-artifacts-tests-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
    return url
}

/// The command-line tool, when installed.
let zstdTool: URL? = ["/usr/bin/zstd", "/usr/local/bin/zstd"].map(URL.init(fileURLWithPath:))
    .first { FileManager.default.isExecutableFile(atPath: $0.path) }

struct TestStats: Codable, Sendable, Equatable {
    var image_tokens_kept: Int
    var decode_ms: Double
}

struct TestParameters: Codable, Sendable, Equatable {
    var max_tokens: Int
}

@Suite("Artifacts")
struct ArtifactsTests {
    @Test func sha256MatchesKnownAnswers() throws {
        // FIPS 180-2 / NIST examples.
        #expect(Checksum.sha256Hex(Data()) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        #expect(Checksum.sha256Hex(Data("abc".utf8)) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        #expect(Checksum.sha256Hex(Data("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq".utf8))
                == "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1")
        // One million 'a's, streamed from a file in pieces.
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let file = directory.appendingPathComponent("a.bin")
        try Data(repeating: UInt8(ascii: "a"), count: 1_000_000).write(to: file)
        #expect(try Checksum.sha256Hex(fileAt: file) == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0")
        #expect(throws: ArtifactError.self) { try Checksum.sha256Hex(fileAt: directory.appendingPathComponent("none")) }
    }

    @Test(arguments: [0, 1, 1_000, 300_000])
    func zstdRoundTrips(size: Int) throws {
        var generator = SystemRandomNumberGenerator()
        let data = Data((0..<size).map { i in i % 3 == 0 ? UInt8.random(in: 0...255, using: &generator) : UInt8(i % 17) })
        let compressed = try Zstd.compress(data)
        #expect(try Zstd.decompress(compressed) == data)
        #expect(try Zstd.decompress(compressed, maxSize: size) == data)
    }

    @Test func concatenatedFramesDecompressToTheirConcatenation() throws {
        let a = Data("first frame ".utf8), b = Data(repeating: 7, count: 100_000)
        #expect(try Zstd.decompress(try Zstd.compress(a) + Zstd.compress(b)) == a + b)
    }

    @Test func corruptOrTruncatedZstdGivesAClearError() throws {
        let data = Data((0..<50_000).map { UInt8($0 % 251) })
        let compressed = try Zstd.compress(data)
        #expect(throws: ArtifactError.truncatedZstd) { try Zstd.decompress(compressed.prefix(compressed.count - 10)) }
        #expect(throws: ArtifactError.zstd(operation: "decompression", reason: "Unknown frame descriptor")) {
            try Zstd.decompress(Data("this is not zstd data".utf8))
        }
        #expect(throws: ArtifactError.zstd(operation: "decompression", reason: "the input is empty")) { try Zstd.decompress(Data()) }
        // A flipped byte inside the compressed block is caught by the block decoder or the content checksum.
        var flipped = compressed
        flipped[flipped.count / 2] ^= 0x5A
        do {
            let result = try Zstd.decompress(flipped)
            Issue.record("corrupt input decompressed to \(result.count) bytes")
        } catch let error as ArtifactError {
            guard case let .zstd(operation, reason) = error else { Issue.record("unexpected \(error)"); return }
            #expect(operation == "decompression" && !reason.isEmpty)
            #expect(error.description.hasPrefix("zstd decompression failed: "))
        }
    }

    @Test func decompressionRefusesToGrowPastItsBound() throws {
        let big = Data(repeating: 0, count: 1 << 20)
        let compressed = try Zstd.compress(big)
        #expect(throws: ArtifactError.decompressedSizeLimit(limit: 1_000)) { try Zstd.decompress(compressed, maxSize: 1_000) }
        #expect(throws: ArtifactError.decompressedSizeLimit(limit: (1 << 20) - 1)) {
            try Zstd.decompress(compressed, maxSize: (1 << 20) - 1)
        }
        #expect(try Zstd.decompress(compressed, maxSize: 1 << 20).count == 1 << 20)
    }

    @Test func aDeclaredContentSizeIsNotAllocatedBeforeTheDataBacksIt() throws {
        // A header may declare gigabytes for a few bytes: the first buffer follows the input, not the header.
        #expect(Zstd.initialCapacity(declared: 3 << 30, inputBytes: 200, maxSize: 4 << 30) == 1 << 16)
        #expect(Zstd.initialCapacity(declared: 3 << 30, inputBytes: 1 << 20, maxSize: 4 << 30) == 16 << 20)
        #expect(Zstd.initialCapacity(declared: 1_000, inputBytes: 200, maxSize: 4 << 30) == 1_001)
        #expect(Zstd.initialCapacity(declared: nil, inputBytes: 200, maxSize: 100) == 101)
        // Real data larger than the first buffer still comes out whole.
        let large = Data((0..<(4 << 20)).map { UInt8(truncatingIfNeeded: ($0 &* 2654435761) >> 13) })
        #expect(try Zstd.decompress(try Zstd.compress(large), maxSize: 8 << 20) == large)
    }

    @Test func atomicWriteReplacesTheFileWhole() throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let url = directory.appendingPathComponent("result.bin")
        let written = try AtomicFile.write(Data("old".utf8), to: url)
        #expect(written.bytes == 3 && written.sha256 == Checksum.sha256Hex(Data("old".utf8)))
        try AtomicFile.write(Data("new contents".utf8), to: url)
        #expect(try Data(contentsOf: url) == Data("new contents".utf8))
        #expect(try FileManager.default.contentsOfDirectory(atPath: directory.path) == ["result.bin"])
    }

    @Test func aFailedAtomicWriteLeavesNoPartialFile() throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        struct SimulatedFailure: Error {}
        let fresh = directory.appendingPathComponent("fresh.bin")
        let existing = directory.appendingPathComponent("existing.bin")
        try AtomicFile.write(Data("intact".utf8), to: existing)
        for url in [fresh, existing] {
            #expect(throws: SimulatedFailure.self) {
                try AtomicFile.write(to: url) { writer in
                    try writer.write(Data(repeating: 1, count: 100_000))
                    throw SimulatedFailure()
                }
            }
        }
        // No temporary file left behind, the new file never appeared, the old one is untouched.
        #expect(try FileManager.default.contentsOfDirectory(atPath: directory.path) == ["existing.bin"])
        #expect(try Data(contentsOf: existing) == Data("intact".utf8))
        // Writing into a missing directory fails with the path named.
        let nowhere = directory.appendingPathComponent("missing/x.bin")
        #expect(performing: { try AtomicFile.write(Data(), to: nowhere) }, throws: { error in
            "\(error)".contains(directory.appendingPathComponent("missing").path) && "\(error)".contains("No such file")
        })
    }

    func record(job: Int64 = 42, attempt: Int = 2) -> ResultRecord<TestParameters, TestStats> {
        ResultRecord(queueID: "0b5c6e0a-9d57-4f3e-8a36-2f1f3f5e1c11", jobID: job, attempt: attempt, customID: "photo-7", text: "A cat on a mat.", tokenIDs: [319, 6635, 373],
                     finishReason: "stop", parameters: TestParameters(max_tokens: 32),
                     stats: TestStats(image_tokens_kept: 144, decode_ms: 12.5),
                     model: ModelFingerprint(fingerprint: "sha256:abc", name: "tiny"),
                     timings: ResultTimings(enqueuedAt: 1, startedAt: 2, finishedAt: 3))
    }

    @Test func resultFilesRoundTripWithTheirChecksum() throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let files = try ResultFile(directory: directory.appendingPathComponent("out/nested"))
        let written = try files.write(record())
        #expect(written.url.lastPathComponent == "42-2.json.zst")
        #expect(try Checksum.sha256Hex(fileAt: written.url) == written.sha256)
        let back = try ResultFile.read(ResultRecord<TestParameters, TestStats>.self, from: written.url, expectedSHA256: written.sha256)
        #expect(back.text == "A cat on a mat." && back.tokenIDs == [319, 6635, 373] && back.stats.image_tokens_kept == 144)
        #expect(back.parameters == TestParameters(max_tokens: 32) && back.model.name == "tiny" && back.timings.finishedAt == 3)
        let summary = try ResultFile.read(ResultSummary.self, from: written.url)
        #expect(summary == ResultSummary(formatVersion: 3, queueID: "0b5c6e0a-9d57-4f3e-8a36-2f1f3f5e1c11", jobID: 42, customID: "photo-7",
                                         text: "A cat on a mat.", finishReason: "stop"))
        #expect(throws: ArtifactError.checksumMismatch(path: written.url.path, expected: "0000", actual: written.sha256)) {
            try ResultFile.read(ResultSummary.self, from: written.url, expectedSHA256: "0000")
        }
    }

    @Test func resultReadersRejectUnknownVersionsAndCorruptFiles() throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let future = directory.appendingPathComponent("future.json.zst")
        try AtomicFile.write(try Zstd.compress(Data(#"{"format_version": 4, "text": "x"}"#.utf8)), to: future)
        #expect(throws: ArtifactError.unsupportedFormatVersion(path: future.path, version: 4, supported: 3)) {
            try ResultFile.read(ResultSummary.self, from: future)
        }
        // Version 1, written before files carried their queue, is still read.
        let older = directory.appendingPathComponent("older.json.zst")
        try AtomicFile.write(try Zstd.compress(Data(#"{"format_version": 1, "job_id": 3, "text": "x", "finish_reason": "stop"}"#.utf8)), to: older)
        #expect(try ResultFile.read(ResultSummary.self, from: older) == ResultSummary(formatVersion: 1, queueID: nil, jobID: 3, customID: nil,
                                                                                     text: "x", finishReason: "stop"))
        // So is version 2, written before stats could carry kept_image_indices.
        let version2 = directory.appendingPathComponent("version2.json.zst")
        try AtomicFile.write(try Zstd.compress(Data(#"{"format_version": 2, "queue_id": "q", "job_id": 4, "text": "y", "finish_reason": "length"}"#.utf8)), to: version2)
        #expect(try ResultFile.read(ResultSummary.self, from: version2) == ResultSummary(formatVersion: 2, queueID: "q", jobID: 4, customID: nil,
                                                                                        text: "y", finishReason: "length"))
        let corrupt = directory.appendingPathComponent("corrupt.json.zst")
        try AtomicFile.write(Data("plain text".utf8), to: corrupt)
        #expect(throws: ArtifactError.inFile(path: corrupt.path, .zstd(operation: "decompression", reason: "Unknown frame descriptor"))) {
            try ResultFile.read(ResultSummary.self, from: corrupt)
        }
        let incomplete = directory.appendingPathComponent("incomplete.json.zst")
        try AtomicFile.write(try Zstd.compress(Data(#"{"format_version": 1, "job_id": 3}"#.utf8)), to: incomplete)
        #expect(throws: ArtifactError.malformedResult(path: incomplete.path, reason: "no text")) {
            try ResultFile.read(ResultSummary.self, from: incomplete)
        }
        #expect(throws: ArtifactError.self) { try ResultFile.read(ResultSummary.self, from: directory.appendingPathComponent("none")) }
    }

    @Test(.enabled(if: zstdTool != nil, "needs the zstd command-line tool"))
    func theZstdCommandLineToolReadsResultFiles() throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let written = try ResultFile(directory: directory).write(record())
        let process = Process()
        process.executableURL = zstdTool
        process.arguments = ["-d", "-c", "-q", written.url.path]
        let output = Pipe()
        process.standardOutput = output
        try process.run()
        let json = output.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        #expect(process.terminationStatus == 0)
        let object = try #require(try JSONSerialization.jsonObject(with: json) as? [String: Any])
        #expect(object["text"] as? String == "A cat on a mat.")
        #expect(object["format_version"] as? Int == 3 && object["custom_id"] as? String == "photo-7")
        #expect(Set(object.keys) == ["format_version", "queue_id", "job_id", "attempt", "custom_id", "text", "token_ids", "finish_reason",
                                     "parameters", "stats", "model", "timings"])
    }
}
