import Foundation

/// LLaMA's tokenizer: sentencepiece BPE with byte fallback, loaded from either `tokenizer.model`
/// (sentencepiece's protobuf; encodes and decodes exactly as the `sentencepiece` library) or a
/// Hugging Face `tokenizer.json` (exactly as the `tokenizers` library). The two agree on ordinary
/// text; they differ where the references differ (`tokenizer.json` matches special tokens such as
/// `</s>` written in the text and decodes with `skip_special_tokens=True`).
public struct SentencePieceTokenizer: Sendable {
    enum Backend: Sendable {
        case sentencePiece(SentencePieceModel)
        case huggingFace(HuggingFaceModel)
    }

    let backend: Backend

    /// The file this tokenizer was loaded from.
    public let file: URL
    /// Id of the beginning-of-sequence token (`<s>`).
    public let bosTokenID: Int32
    /// Id of the end-of-sequence token (`</s>`).
    public let eosTokenID: Int32
    /// Id of the unknown token (`<unk>`).
    public let unknownTokenID: Int32
    /// Number of ids (the largest id + 1).
    public let vocabularySize: Int

    /// Loads `tokenizer.model` or a `*.json` tokenizer file, choosing the format by file name.
    /// Special ids come from the file: `tokenizer.model` names them in its trainer spec; a
    /// `tokenizer.json` does not name BOS and EOS, so they are its `<s>` and `</s>` tokens (LLaMA's
    /// spelling) and the unknown id is the BPE model's `unk_token`.
    public init(contentsOf url: URL) throws(TokenizerError) {
        file = url
        if url.pathExtension.lowercased() == "json" {
            let model = try HuggingFaceModel(contentsOf: url)
            func special(_ text: String) throws(TokenizerError) -> Int32 {
                guard let id = model.id(of: Array(text.utf8)) else {
                    throw TokenizerError(.malformed, file: url, "no \(text) token in the vocab")
                }
                return id
            }
            backend = .huggingFace(model)
            bosTokenID = try special("<s>")
            eosTokenID = try special("</s>")
            guard let unknown = model.unknownID else {
                throw TokenizerError(.malformed, file: url, "the BPE model has no unk_token")
            }
            unknownTokenID = unknown
            vocabularySize = model.vocabularySize
        } else if url.pathExtension.lowercased() == "model" {
            let model = try SentencePieceModel(contentsOf: url)
            backend = .sentencePiece(model)
            bosTokenID = model.bosID
            eosTokenID = model.eosID
            unknownTokenID = model.unknownID
            vocabularySize = model.pieces.count
            guard bosTokenID >= 0, eosTokenID >= 0 else {
                throw TokenizerError(.malformed, file: url, "the model has no bos_id or eos_id")
            }
        } else {
            throw TokenizerError(.unknownFormat, file: url, "expected tokenizer.model or tokenizer.json")
        }
    }

    /// Loads `directory/tokenizer.model`, or `directory/tokenizer.json` when there is no
    /// `tokenizer.model` (LLaVA itself uses the slow, sentencepiece tokenizer).
    public static func load(directory: URL) throws(TokenizerError) -> SentencePieceTokenizer {
        for name in ["tokenizer.model", "tokenizer.json"] {
            let url = directory.appendingPathComponent(name)
            if FileManager.default.fileExists(atPath: url.path) { return try SentencePieceTokenizer(contentsOf: url) }
        }
        throw TokenizerError(.unknownFormat, file: directory, "neither tokenizer.model nor tokenizer.json is there")
    }

    /// Token ids for `text`, without BOS or EOS: `sp.encode(text)` for `tokenizer.model`,
    /// `Tokenizer.encode(text, add_special_tokens=False).ids` for `tokenizer.json`.
    public func encode(_ text: String) -> [Int32] {
        switch backend {
        case .sentencePiece(let model): model.encode(Array(text.utf8), addDummyPrefix: model.addDummyPrefix)
        case .huggingFace(let model): model.encode(Array(text.utf8))
        }
    }

    /// Text for `ids`: `sp.decode(ids)` for `tokenizer.model`, `Tokenizer.decode(ids)` for
    /// `tokenizer.json`. Ids outside the vocabulary are skipped.
    public func decode(_ ids: [Int32]) -> String {
        switch backend {
        case .sentencePiece(let model): model.decode(ids)
        case .huggingFace(let model): model.decode(ids)
        }
    }

    /// The vocabulary entry for `id` (U+2581 for spaces, `<0xNN>` for byte pieces), or nil
    /// outside the vocabulary.
    public func piece(_ id: Int32) -> String? {
        switch backend {
        case .sentencePiece(let model):
            guard id >= 0, Int(id) < model.pieces.count else { return nil }
            return String(decoding: model.pieces[Int(id)].bytes, as: UTF8.self)
        case .huggingFace(let model):
            return model.token(id).map { String(decoding: $0, as: UTF8.self) }
        }
    }

    /// Ids as transformers' slow `LlamaTokenizer` (legacy = false, as in Vicuna's and LLaVA's
    /// tokenizer_config.json) gives for `tokenize(text)`: U+2581 in the text becomes a space, a
    /// U+2581 prefix is added, `<s>`, `</s>` and `<unk>` written in the text become their ids,
    /// and each piece of text between them is encoded with sentencepiece without the dummy prefix
    /// (text that starts with a space through the `<unk>` trick of `LlamaTokenizer._tokenize`).
    /// No BOS. This is what LLaVA's `tokenizer_image_token` applies to each prompt chunk.
    public func encodeAsSlowLlamaTokenizer(_ text: String) -> [Int32] {
        if text.isEmpty { return [] }
        let input = UTF8Bytes.metaspace + UTF8Bytes.replacing(UTF8Bytes.metaspace, with: [0x20], in: Array(text.utf8))
        let specials: [(bytes: [UInt8], id: Int32)] = [unknownTokenID, bosTokenID, eosTokenID]
            .compactMap { id in piece(id).map { (Array($0.utf8), id) } }
            .sorted { $0.bytes.count > $1.bytes.count }
        let unknownPiece = Array((piece(unknownTokenID) ?? "").utf8)
        let unknownLength = encodeWithoutPrefix(unknownPiece).count

        func tokenizeSegment(_ segment: [UInt8]) -> [Int32] {
            guard UTF8Bytes.hasPrefix(segment, UTF8Bytes.metaspace) || segment.first == 0x20 else {
                return encodeWithoutPrefix(segment)
            }
            let ids = encodeWithoutPrefix(unknownPiece + segment)
            return ids.count >= unknownLength ? Array(ids[unknownLength...]) : ids
        }

        var ids: [Int32] = []
        var secondIsSpecial = false
        var segmentStart = 0
        var offset = 0
        while offset < input.count {
            if let special = specials.first(where: { UTF8Bytes.hasPrefix(input, $0.bytes, at: offset) }) {
                if segmentStart < offset { ids += tokenizeSegment(Array(input[segmentStart..<offset])) }
                if ids.count == 1 { secondIsSpecial = true }
                ids.append(special.id)
                offset += special.bytes.count
                segmentStart = offset
            } else {
                offset += 1
            }
        }
        if segmentStart < input.count { ids += tokenizeSegment(Array(input[segmentStart...])) }
        // LlamaTokenizer.tokenize drops a lone "▁" in front of a leading special token.
        if ids.count > 1, secondIsSpecial, piece(ids[0]) == "\u{2581}" { ids.removeFirst() }
        return ids
    }

    private func encodeWithoutPrefix(_ bytes: [UInt8]) -> [Int32] {
        switch backend {
        case .sentencePiece(let model): model.encode(bytes, addDummyPrefix: false)
        case .huggingFace(let model): model.encodeWithoutAddedTokens(bytes, addPrefix: false)
        }
    }
}
