import Foundation
import Testing
import Tokenizer

/// Single behaviours, spelled out. The corpus parity tests cover them too; these say which rule
/// broke when one does. Expected pieces were checked against sentencepiece 0.2.3.
@Suite struct EncodingBehaviourTests {
    func pieces(_ tokenizer: SentencePieceTokenizer, _ text: String) -> [String] {
        tokenizer.encode(text).map { tokenizer.piece($0) ?? "?" }
    }

    @Test func userDefinedPiecesAreMatchedBeforeAnyMerge() throws {
        let tokenizer = try Fixtures.tokenizer("udef/tokenizer.model")
        #expect(pieces(tokenizer, "a[[x]]b") == ["▁a", "[[x]]", "b"])
        #expect(pieces(tokenizer, "[[[x]]") == ["▁", "[[", "[", "x", "]", "]"])
    }

    @Test func addedTokensInTokenizerJSONSplitTheTextAndEachPartGetsThePrefix() throws {
        // tokenizers matches added tokens on the raw text first (leftmost, longest), then
        // normalizes each remaining part on its own: the Prepend normalizer adds U+2581 to each.
        let tokenizer = try Fixtures.tokenizer("udef/tokenizer.json")
        #expect(pieces(tokenizer, "a[[x]]b") == ["▁a", "[[x]]", "▁b"])
        #expect(pieces(tokenizer, "[[[x]]") == ["[[", "▁[", "x", "]", "]"])
        let llama = try Fixtures.tokenizer("sp32k/tokenizer.json")
        #expect(llama.encode("x</s>").last == llama.eosTokenID)
        #expect(try Fixtures.tokenizer("sp32k/tokenizer.model").encode("x</s>").last != llama.eosTokenID)
    }

    @Test func unknownRunsBecomeOneUnknownIdWithoutByteFallback() throws {
        let tokenizer = try Fixtures.tokenizer("udef/tokenizer.model")
        let unknown = tokenizer.unknownTokenID
        let ids = tokenizer.encode("\u{13000}\u{13001}\u{13002} ok")
        #expect(ids.filter { $0 == unknown }.count == 1)
        #expect(pieces(tokenizer, "ok \u{13000} \u{13001}") == ["▁o", "k", "▁", "<unk>", "▁", "<unk>"])
        #expect(tokenizer.decode(ids) == " \u{2047}  ok")  // sentencepiece shows the unk surface " ⁇ "
    }

    @Test func mergesThatProduceAnUnusedPieceAreSplitBack() throws {
        // "se", "in", "re" and "or" are UNUSED in this model.
        let tokenizer = try Fixtures.tokenizer("udef/tokenizer.model")
        #expect(pieces(tokenizer, "seinreor") == ["▁se", "i", "n", "r", "e", "o", "r"])
    }

    @Test func extraWhitespaceIsRemovedWhenTheModelSaysSo() throws {
        let tokenizer = try Fixtures.tokenizer("udef/tokenizer.model")
        #expect(pieces(tokenizer, "  x  y   ") == ["▁", "x", "▁", "y"])
        #expect(tokenizer.encode("   ").isEmpty)
    }

    @Test(arguments: ["sp1k/tokenizer.model", "sp32k/tokenizer.model", "sp32k/tokenizer.json"])
    func whitespaceIsKeptAsLlamaDoes(file: String) throws {
        let tokenizer = try Fixtures.tokenizer(file)
        for text in ["  x  y   ", "\tx\n", " ", "a\n\nb"] {
            #expect(tokenizer.decode(tokenizer.encode(text)) == text)
        }
        #expect(tokenizer.encode("").isEmpty)
        #expect(pieces(tokenizer, " ").allSatisfy { $0.hasPrefix("\u{2581}") })
    }

    @Test(arguments: ["sp1k/tokenizer.model", "sp32k/tokenizer.model", "sp1k/tokenizer.json"])
    func byteFallbackMakesEveryStringRoundTrip(file: String) throws {
        // Any text without U+2581 (which decodes to a space) survives encode then decode,
        // whatever its scripts: unassigned and private-use code points included.
        let tokenizer = try Fixtures.tokenizer(file)
        var generator = SplitMix64(seed: 7)
        var failures: [String] = []
        for _ in 0..<1500 {
            var scalars = String.UnicodeScalarView()
            for _ in 0..<Int(generator.next() % 24) {
                let pick = generator.next() % 4
                let value: UInt64 = switch pick {
                case 0: 0x20 + generator.next() % 0x5F
                case 1: 0xA0 + generator.next() % 0x3000
                case 2: 0xE000 + generator.next() % 0x2000
                default: 0x10000 + generator.next() % 0xFFFF0
                }
                if let scalar = Unicode.Scalar(UInt32(value)), scalar != "\u{2581}" { scalars.append(scalar) }
            }
            let text = String(scalars)
            if Array(tokenizer.decode(tokenizer.encode(text)).unicodeScalars) != Array(text.unicodeScalars) {
                failures.append(String(reflecting: text))
            }
        }
        #expect(failures.isEmpty, "\(failures.count) strings do not round-trip, e.g. \(failures.prefix(3))")
    }
}

/// A small deterministic generator for test inputs.
struct SplitMix64 {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
