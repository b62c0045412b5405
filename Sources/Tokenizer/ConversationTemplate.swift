/// Token ids of a prompt around its image slot: the engine puts the projected image embeddings
/// between `idsBeforeImage` and `idsAfterImage`. BOS is the first of `idsBeforeImage`.
public struct PromptTokens: Sendable, Equatable {
    public var idsBeforeImage: [Int32]
    public var idsAfterImage: [Int32]

    public init(idsBeforeImage: [Int32], idsAfterImage: [Int32]) {
        self.idsBeforeImage = idsBeforeImage
        self.idsAfterImage = idsAfterImage
    }
}

/// A LLaVA conversation template with one image before the question (DYNAMIC_LLAVA.md section 1).
/// Only `vicunaV1` (LLaVA's `conv_vicuna_v1`, `SeparatorStyle.TWO`) is provided.
public struct ConversationTemplate: Sendable, Equatable {
    /// Where the image goes in the prompt text.
    public static let imagePlaceholder = "<image>"

    public var system: String
    public var userRole: String
    public var assistantRole: String
    /// The separator after the system message and after each user message (`sep` in LLaVA).
    public var separator: String

    public init(system: String, userRole: String, assistantRole: String, separator: String) {
        self.system = system
        self.userRole = userRole
        self.assistantRole = assistantRole
        self.separator = separator
    }

    /// LLaVA-1.5's `vicuna_v1` template.
    public static let vicunaV1 = ConversationTemplate(
        system: "A chat between a curious user and an artificial intelligence assistant. "
            + "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        userRole: "USER", assistantRole: "ASSISTANT", separator: " ")

    /// The prompt text for one image and `question`, split at the image:
    /// `system + sep + "USER: "` before it and `"\n" + question + sep + "ASSISTANT:"` after it,
    /// as LLaVA builds `DEFAULT_IMAGE_TOKEN + "\n" + question` and `conv.get_prompt()`.
    public func promptText(question: String) -> (beforeImage: String, afterImage: String) {
        (system + separator + userRole + ": ", "\n" + question + separator + assistantRole + ":")
    }

    /// The prompt's ids as LLaVA's `tokenizer_image_token` computes them: each side of the image
    /// tokenized separately by the slow `LlamaTokenizer` (see
    /// `SentencePieceTokenizer.encodeAsSlowLlamaTokenizer`), BOS only at the very start.
    /// We differ in one respect: an `<image>` written inside the question stays text here, where
    /// LLaVA would open a second image slot (we take one image per sample).
    public func tokens(question: String, tokenizer: SentencePieceTokenizer) -> PromptTokens {
        let text = promptText(question: question)
        return PromptTokens(
            idsBeforeImage: [tokenizer.bosTokenID] + tokenizer.encodeAsSlowLlamaTokenizer(text.beforeImage),
            idsAfterImage: tokenizer.encodeAsSlowLlamaTokenizer(text.afterImage))
    }
}
