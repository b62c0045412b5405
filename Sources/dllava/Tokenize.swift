import ArgumentParser
import DynamicLLaVA
import Foundation
import Tokenizer

struct Tokenize: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Print the token ids of a text with the model's tokenizer.",
        discussion: """
        The ids are those the text gets as the first chunk of a prompt: BOS first (as the chat \
        template includes it), then the SentencePiece pieces with the dummy-prefix space. \
        --no-bos leaves BOS out, as for a chunk after the image slot. With --prompt the whole \
        vicuna_v1 prompt is shown, split at the image slot.
        """)

    @Option(help: "Model directory (tokenizer.model or tokenizer.json inside). Defaults to $DLLAVA_MODEL, else the model Scripts/install installed.")
    var model: String?

    @Option(help: "The text to tokenize.")
    var text: String

    @Flag(name: .customLong("no-bos"), help: "Leave out the BOS id.")
    var noBOS = false

    @Flag(help: "Treat --text as the user's question and show the whole prompt's ids around the image slot.")
    var prompt = false

    @Flag(help: "Print JSON: {\"ids\": [...], \"pieces\": [...]} (or ids_before_image / ids_after_image with --prompt).")
    var json = false

    func run() throws {
        try reportingFailures {
            guard let directory = BuildInfo.modelDirectory(model) else {
                throw CommandFailure(message: "no model: pass --model DIR or set DLLAVA_MODEL", code: 64)
            }
            let tokenizer = try SentencePieceTokenizer.load(directory: URL(fileURLWithPath: directory))
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys]
            if prompt {
                let tokens = ConversationTemplate.vicunaV1.tokens(question: text, tokenizer: tokenizer)
                if json {
                    let object = ["ids_before_image": tokens.idsBeforeImage, "ids_after_image": tokens.idsAfterImage]
                    print(String(decoding: try encoder.encode(object), as: UTF8.self))
                } else {
                    print(tokens.idsBeforeImage.map(String.init).joined(separator: " ") + " <image> "
                          + tokens.idsAfterImage.map(String.init).joined(separator: " "))
                }
                return
            }
            let ids = (noBOS ? [] : [tokenizer.bosTokenID]) + tokenizer.encode(text)
            if json {
                struct Output: Encodable { let ids: [Int32]; let pieces: [String] }
                let output = Output(ids: ids, pieces: ids.map { tokenizer.piece($0) ?? "" })
                print(String(decoding: try encoder.encode(output), as: UTF8.self))
            } else {
                print(ids.map(String.init).joined(separator: " "))
            }
        }
    }
}
