import Foundation
import Testing
import Tokenizer

/// (model directory, tokenizer file) pairs with goldens.
let tokenizerFiles: [(String, String)] = [
    ("sp1k", "tokenizer.model"), ("sp1k", "tokenizer.json"), ("sp1k", "tokenizer-metaspace.json"),
    ("sp1k", "tokenizer-variant.json"),
    ("sp32k", "tokenizer.model"), ("sp32k", "tokenizer.json"),
    ("udef", "tokenizer.model"), ("udef", "tokenizer.json"),
]

@Suite struct TokenizerParityTests {
    @Test(arguments: tokenizerFiles)
    func encodeGivesTheReferenceIdsOnEveryCorpusLine(model: String, file: String) throws {
        let tokenizer = try Fixtures.tokenizer("\(model)/\(file)")
        let reference = try #require(Fixtures.goldens.models[model]?.references[file])
        let corpus = Fixtures.corpus
        #expect(corpus.count >= 2000)
        #expect(reference.ids.count == corpus.count)
        let actual = corpus.map { tokenizer.encode($0) }
        let report = mismatchReport("\(model)/\(file) ids", inputs: corpus, expected: reference.ids, actual: actual)
        #expect(report == nil, "\(report ?? "")")
    }

    @Test(arguments: tokenizerFiles)
    func decodeOfTheReferenceIdsGivesTheReferenceText(model: String, file: String) throws {
        let tokenizer = try Fixtures.tokenizer("\(model)/\(file)")
        let reference = try #require(Fixtures.goldens.models[model]?.references[file])
        let actual = reference.ids.map { tokenizer.decode($0) }
        let report = mismatchReport("\(model)/\(file) decode", inputs: Fixtures.corpus,
                                    expected: reference.decoded, actual: actual)
        #expect(report == nil, "\(report ?? "")")
    }

    @Test(arguments: tokenizerFiles)
    func decodeOfArbitraryIdsMatchesTheReference(model: String, file: String) throws {
        // Control and unknown ids, lone and broken byte pieces, pieces in odd orders.
        let tokenizer = try Fixtures.tokenizer("\(model)/\(file)")
        let goldens = try #require(Fixtures.goldens.models[model])
        let reference = try #require(goldens.references[file])
        let actual = goldens.idLists.map { tokenizer.decode($0) }
        let report = mismatchReport("\(model)/\(file) decode of id lists", inputs: goldens.idLists.map { "\($0)" },
                                    expected: reference.idListDecoded, actual: actual)
        #expect(report == nil, "\(report ?? "")")
    }

    @Test(arguments: tokenizerFiles)
    func specialIdsAndVocabularySizeComeFromTheFile(model: String, file: String) throws {
        let tokenizer = try Fixtures.tokenizer("\(model)/\(file)")
        let goldens = try #require(Fixtures.goldens.models[model])
        #expect(tokenizer.vocabularySize == goldens.vocabularySize)
        #expect(tokenizer.bosTokenID == goldens.bos)
        #expect(tokenizer.eosTokenID == goldens.eos)
        #expect(tokenizer.unknownTokenID == goldens.unknown)
        #expect(tokenizer.piece(tokenizer.bosTokenID) == "<s>")
        #expect(tokenizer.piece(tokenizer.eosTokenID) == "</s>")
        #expect(tokenizer.piece(Int32(goldens.vocabularySize)) == nil)
        #expect(tokenizer.piece(-1) == nil)
    }

    @Test func theTinyModelsTokenizerHasExactlyOneThousandIds() throws {
        // The engine's tiny test models have vocab_size 1000 and use this tokenizer.
        let tokenizer = try Fixtures.tokenizer("sp1k/tokenizer.model")
        #expect(tokenizer.vocabularySize == 1000)
        #expect(tokenizer.piece(999) != nil)
        #expect(tokenizer.piece(1000) == nil)
        let ids = Fixtures.corpus.flatMap { tokenizer.encode($0) }
        #expect(ids.allSatisfy { (0..<1000).contains($0) })
    }

    @Test func bytesWithoutAPieceFallBackToBytePieces() throws {
        let tokenizer = try Fixtures.tokenizer("sp1k/tokenizer.model")
        // U+13000 (Egyptian hieroglyph A001) is not in the 1k vocabulary: four byte pieces.
        let ids = tokenizer.encode("\u{13000}")
        let pieces = ids.compactMap { tokenizer.piece($0) }
        #expect(pieces.suffix(4) == ["<0xF0>", "<0x93>", "<0x80>", "<0x80>"])
        #expect(tokenizer.decode(ids) == "\u{13000}")
    }

    @Test func canonicallyEquivalentTextIsNotConflated() throws {
        // Swift's String equality treats these as equal; the tokenizer must not.
        let tokenizer = try Fixtures.tokenizer("sp32k/tokenizer.model")
        let precomposed = tokenizer.encode("caf\u{E9}")
        let decomposed = tokenizer.encode("cafe\u{301}")
        #expect(precomposed != decomposed)
        #expect(Array(tokenizer.decode(decomposed).unicodeScalars) == Array("cafe\u{301}".unicodeScalars))
    }

    @Test func loadingADirectoryPrefersTokenizerModel() throws {
        let tokenizer = try SentencePieceTokenizer.load(directory: Fixtures.url("sp32k"))
        #expect(tokenizer.file.lastPathComponent == "tokenizer.model")
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("dllava-tok-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        try FileManager.default.copyItem(at: Fixtures.url("sp1k/tokenizer.json"),
                                         to: directory.appendingPathComponent("tokenizer.json"))
        let fromJSON = try SentencePieceTokenizer.load(directory: directory)
        #expect(fromJSON.file.lastPathComponent == "tokenizer.json")
        #expect(fromJSON.encode("hello world") == (try Fixtures.tokenizer("sp1k/tokenizer.model")).encode("hello world"))
    }

    @Test(arguments: ["sp32k/tokenizer.model", "sp32k/tokenizer.json"])
    func longLinesEncodeInLinearishTime(file: String) throws {
        // A quadratic merge loop would take minutes on this; the heap-based one takes well under a second.
        let tokenizer = try Fixtures.tokenizer(file)
        let line = String(repeating: "The quick brown fox 123 jumps over 漢字 and 😀 naïve ", count: 3000)
        let start = ContinuousClock.now
        let ids = tokenizer.encode(line)
        let elapsed = ContinuousClock.now - start
        #expect(elapsed < .seconds(20), "encoding \(line.utf8.count) bytes took \(elapsed)")
        #expect(tokenizer.decode(ids) == line)
        let unbroken = String(repeating: "a", count: 100_000)
        let start2 = ContinuousClock.now
        let ids2 = tokenizer.encode(unbroken)
        #expect(ContinuousClock.now - start2 < .seconds(20))
        #expect(tokenizer.decode(ids2) == unbroken)
    }
}
