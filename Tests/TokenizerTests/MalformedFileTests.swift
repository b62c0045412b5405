import Foundation
import Testing
import Tokenizer

@Suite struct MalformedFileTests {
    /// Writes `bytes` to a fresh temporary `name` and returns its URL.
    func write(_ bytes: [UInt8], as name: String) throws -> URL {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("dllava-tok-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        let url = directory.appendingPathComponent(name)
        try Data(bytes).write(to: url)
        return url
    }

    func loadError(_ url: URL) -> TokenizerError? {
        defer { try? FileManager.default.removeItem(at: url.deletingLastPathComponent()) }
        do {
            _ = try SentencePieceTokenizer(contentsOf: url)
            return nil
        } catch {
            return error
        }
    }

    @Test func emptyModelFileIsMalformedAndNamed() throws {
        let url = try write([], as: "tokenizer.model")
        let error = try #require(loadError(url))
        #expect(error.kind == .malformed)
        #expect(error.description.contains(url.path))
        #expect(error.description.contains("no pieces"))
    }

    @Test(arguments: [0.1, 0.5, 0.999])
    func truncatedModelFileIsATruncatedProtobuf(fraction: Double) throws {
        let bytes = [UInt8](try Data(contentsOf: Fixtures.url("sp1k/tokenizer.model")))
        let url = try write(Array(bytes.prefix(Int(Double(bytes.count) * fraction))), as: "tokenizer.model")
        let error = try #require(loadError(url))
        #expect(error.kind == .malformed)
        #expect(error.description.contains(url.path))
        #expect(error.description.contains("truncated"), "\(error)")
    }

    @Test func garbageModelFileIsMalformed() throws {
        let url = try write(Array("this is not a protobuf at all, just text\n".utf8), as: "tokenizer.model")
        let error = try #require(loadError(url))
        #expect(error.kind == .malformed)
        #expect(error.description.contains(url.path))
    }

    @Test func unigramModelIsRejectedAsUnsupported() throws {
        // The 1k model with trainer_spec.model_type rewritten from BPE (2) to UNIGRAM (1).
        var bytes = [UInt8](try Data(contentsOf: Fixtures.url("sp1k/tokenizer.model")))
        let trainerSpec = try #require(Self.fieldOffset(bytes, field: 2))
        let modelType = try #require(Self.fieldOffset(bytes, field: 3, within: trainerSpec))
        #expect(bytes[modelType.valueStart] == 2)
        bytes[modelType.valueStart] = 1
        let url = try write(bytes, as: "tokenizer.model")
        let error = try #require(loadError(url))
        #expect(error.kind == .unsupported)
        #expect(error.description.contains("unigram"))
        #expect(error.description.contains(url.path))
    }

    @Test func garbageJSONIsMalformedAndNamed() throws {
        let url = try write(Array("{\"model\": {\"type\": \"BPE\", \"vocab\": {".utf8), as: "tokenizer.json")
        let error = try #require(loadError(url))
        #expect(error.kind == .malformed)
        #expect(error.description.contains(url.path))
        #expect(error.description.contains("JSON"))
    }

    @Test func emptyJSONFileIsMalformed() throws {
        let url = try write([], as: "tokenizer.json")
        let error = try #require(loadError(url))
        #expect(error.kind == .malformed)
        #expect(error.description.contains(url.path))
    }

    /// Found by fuzzing: one vocab id of 2^31 - 1 made the loader allocate a 16 GiB id table
    /// (Tests/Fuzz/corpus/tokenizer-json/crash-vocab-id-int32-max); 10^7 is enough to show the rule.
    @Test func jsonTokenIDBeyondTheDefinedTokensIsMalformed() throws {
        let id = 10_000_000
        let json = "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"<unk>\": 0, \"<s>\": 1, \"</s>\": 2, \"a\": \(id)}, \"merges\": [], "
            + "\"unk_token\": \"<unk>\"}}"
        let url = try write(Array(json.utf8), as: "tokenizer.json")
        let error = try #require(loadError(url))
        #expect(error.kind == .malformed)
        #expect(error.description.contains(url.path))
        #expect(error.description.contains("token id \(id) lies beyond the 4 tokens"))
    }

    @Test func jsonWithoutAModelIsMalformed() throws {
        let url = try write(Array("{\"version\": \"1.0\"}".utf8), as: "tokenizer.json")
        let error = try #require(loadError(url))
        #expect(error.kind == .malformed)
        #expect(error.description.contains("model"))
    }

    @Test func unigramJSONIsRejectedAsUnsupported() throws {
        let url = try write(Array("{\"model\": {\"type\": \"Unigram\", \"vocab\": []}}".utf8), as: "tokenizer.json")
        let error = try #require(loadError(url))
        #expect(error.kind == .unsupported)
        #expect(error.description.contains("Unigram"))
    }

    @Test func missingFileIsUnreadable() {
        let url = URL(fileURLWithPath: "/nonexistent/dllava/tokenizer.model")
        #expect(throws: TokenizerError.self) { try SentencePieceTokenizer(contentsOf: url) }
        do {
            _ = try SentencePieceTokenizer(contentsOf: url)
        } catch {
            #expect(error.kind == .unreadable)
            #expect(error.description.contains(url.path))
        }
    }

    @Test func otherFileNamesAreAnUnknownFormat() throws {
        let url = try write([1, 2, 3], as: "vocab.txt")
        let error = try #require(loadError(url))
        #expect(error.kind == .unknownFormat)
    }

    /// Offset of the value of the first length-delimited or varint `field` in a protobuf message.
    static func fieldOffset(_ bytes: [UInt8], field: Int, within range: (valueStart: Int, end: Int)? = nil)
        -> (valueStart: Int, end: Int)?
    {
        var position = range?.valueStart ?? 0
        let end = range?.end ?? bytes.count
        func varint() -> Int {
            var result = 0, shift = 0
            while true {
                let byte = bytes[position]
                position += 1
                result |= Int(byte & 0x7F) << shift
                if byte & 0x80 == 0 { return result }
                shift += 7
            }
        }
        while position < end {
            let key = varint()
            let start = position
            switch key & 7 {
            case 0:
                _ = varint()
                if key >> 3 == field { return (start, position) }
            case 2:
                let length = varint()
                let valueStart = position
                position += length
                if key >> 3 == field { return (valueStart, position) }
            case 5: position += 4
            case 1: position += 8
            default: return nil
            }
        }
        return nil
    }
}
