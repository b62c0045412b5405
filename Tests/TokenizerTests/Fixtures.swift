import Foundation
import Tokenizer

/// The committed test models and goldens (Scripts/reference/make_tokenizer_goldens.py).
enum Fixtures {
    static let directory = Bundle.module.url(forResource: "Fixtures", withExtension: nil)!

    static func url(_ path: String) -> URL { directory.appendingPathComponent(path) }

    static func tokenizer(_ path: String) throws -> SentencePieceTokenizer {
        try SentencePieceTokenizer(contentsOf: url(path))
    }

    /// The test corpus: one JSON string per line. (JSONDecoder, not JSONSerialization: the latter
    /// drops a leading U+FEFF from strings.)
    static let corpus: [String] = {
        let text = try! String(contentsOf: url("corpus.jsonl"), encoding: .utf8)
        let array = "[" + text.split(separator: "\n", omittingEmptySubsequences: true).joined(separator: ",") + "]"
        return try! JSONDecoder().decode([String].self, from: Data(array.utf8))
    }()

    struct Reference {
        var ids: [[Int32]]
        /// Decode of `ids`.
        var decoded: [String]
        /// Decodes of `ModelGoldens.idLists`.
        var idListDecoded: [String]
    }

    struct ModelGoldens {
        var vocabularySize: Int
        var bos: Int32, eos: Int32, unknown: Int32
        var idLists: [[Int32]]
        /// Keyed by file name: "tokenizer.model", "tokenizer.json", "tokenizer-metaspace.json".
        var references: [String: Reference]
    }

    struct PromptGolden: Decodable {
        var question: String
        var before: [Int32]
        var after: [Int32]
        enum CodingKeys: String, CodingKey {
            case question, before = "ids_before_image", after = "ids_after_image"
        }
    }

    private struct File: Decodable {
        struct Entry: Decodable {
            var vocab_size: Int?
            var bos: Int32?, eos: Int32?, unk: Int32?
            var ids: [[Int32]?]
            var decoded: [String?]
            var id_lists: [[Int32]]?
            var id_list_decoded: [String]
        }
        struct Prompts: Decodable {
            var items: [PromptGolden]
        }
        var models: [String: [String: Entry]]
        var prompts: Prompts
    }

    static let goldens: (models: [String: ModelGoldens], prompts: [PromptGolden]) = {
        let file = try! JSONDecoder().decode(File.self, from: Data(contentsOf: url("goldens.json")))
        var models: [String: ModelGoldens] = [:]
        for (name, entries) in file.models {
            let model = entries["model"]!
            let spIDs = model.ids.map { $0! }
            // null stands for "equal to the corpus line" in `decoded`.
            func decoded(_ list: [String?]) -> [String] { zip(list, corpus).map { $0 ?? $1 } }
            var references = [
                "tokenizer.model": Reference(ids: spIDs, decoded: decoded(model.decoded), idListDecoded: model.id_list_decoded),
            ]
            for (file, entry) in entries where file.hasSuffix(".json") {
                // null stands for "equal to the sentencepiece ids" in a tokenizer.json's `ids`.
                references[file] = Reference(ids: zip(entry.ids, spIDs).map { $0 ?? $1 }, decoded: decoded(entry.decoded),
                                             idListDecoded: entry.id_list_decoded)
            }
            models[name] = ModelGoldens(vocabularySize: model.vocab_size!, bos: model.bos!, eos: model.eos!,
                                        unknown: model.unk!, idLists: model.id_lists!, references: references)
        }
        return (models, file.prompts.items)
    }()
}

/// "N of M differ; first: ..." for a failure message.
func mismatchReport<T: Equatable>(_ name: String, inputs: [String], expected: [T], actual: [T], limit: Int = 5) -> String? {
    let differing = expected.indices.filter { expected[$0] != actual[$0] }
    guard !differing.isEmpty else { return nil }
    let examples = differing.prefix(limit).map { i in
        "  line \(i) \(String(reflecting: inputs[i]).prefix(120)):\n    expected \(String(describing: expected[i]).prefix(300))\n    actual   \(String(describing: actual[i]).prefix(300))"
    }
    return "\(name): \(differing.count) of \(expected.count) differ; first:\n" + examples.joined(separator: "\n")
}
