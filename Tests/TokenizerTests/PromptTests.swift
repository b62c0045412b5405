import Foundation
import Testing
import Tokenizer

@Suite struct PromptTests {
    @Test(arguments: ["sp32k/tokenizer.model", "sp32k/tokenizer.json"])
    func vicunaPromptIdsMatchLlavasTokenizerImageToken(file: String) throws {
        let tokenizer = try Fixtures.tokenizer(file)
        let goldens = Fixtures.goldens.prompts
        #expect(goldens.count >= 20)
        var failures: [String] = []
        for golden in goldens {
            let tokens = ConversationTemplate.vicunaV1.tokens(question: golden.question, tokenizer: tokenizer)
            if tokens != PromptTokens(idsBeforeImage: golden.before, idsAfterImage: golden.after) {
                failures.append("\(String(reflecting: golden.question)):\n  expected \(golden.before) | \(golden.after)\n  actual   \(tokens.idsBeforeImage) | \(tokens.idsAfterImage)")
            }
        }
        #expect(failures.isEmpty, "\(failures.count) of \(goldens.count) prompts differ:\n\(failures.prefix(3).joined(separator: "\n"))")
    }

    @Test func bosOpensThePromptAndAppearsNowhereElse() throws {
        let tokenizer = try Fixtures.tokenizer("sp1k/tokenizer.model")
        let tokens = ConversationTemplate.vicunaV1.tokens(question: "What is this?", tokenizer: tokenizer)
        #expect(tokens.idsBeforeImage.first == tokenizer.bosTokenID)
        #expect(!tokens.idsBeforeImage.dropFirst().contains(tokenizer.bosTokenID))
        #expect(!tokens.idsAfterImage.contains(tokenizer.bosTokenID))
    }

    @Test func promptTextIsTheVicunaV1Template() {
        let text = ConversationTemplate.vicunaV1.promptText(question: "Describe it.")
        #expect(text.beforeImage + ConversationTemplate.imagePlaceholder + text.afterImage
            == "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions. USER: <image>\nDescribe it. ASSISTANT:")
    }
}
