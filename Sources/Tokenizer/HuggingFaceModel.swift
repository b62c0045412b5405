import Foundation

/// A BPE tokenizer read from a Hugging Face `tokenizer.json`, encoding and decoding the way the
/// `tokenizers` library does (added-token splitting, normalizer, pre-tokenizer, BPE by merge rank
/// with byte fallback, decoder chain) for the variants transformers emits for LLaMA.
struct HuggingFaceModel: Sendable {
    struct AddedToken: Sendable {
        var content: [UInt8]
        var id: Int32
        var special: Bool
    }

    enum NormalizerStep: Sendable {
        case prepend([UInt8])
        case replace([UInt8], [UInt8])
    }

    enum PrependScheme: Sendable { case always, first, never }

    struct Metaspace: Sendable {
        var replacement: [UInt8]
        var prependScheme: PrependScheme
        var split: Bool
    }

    enum DecoderStep: Sendable {
        case replace([UInt8], [UInt8])
        case byteFallback
        case fuse
        case strip(content: Unicode.Scalar, start: Int, stop: Int)
    }

    private var vocab = ByteTable(capacity: 0)
    private var tokens: [[UInt8]] = []
    private var merges: [UInt64: (rank: Int32, id: Int32)] = [:]
    private(set) var unknownID: Int32?
    private var fuseUnknown = false
    private var byteFallback = false
    private var ignoreMerges = false
    private var byteIDs: [Int32?] = []
    private var added: [AddedToken] = []
    private var addedByFirstByte: [[Int]] = Array(repeating: [], count: 256)
    private var specialContents = Set<[UInt8]>()
    private var normalizer: [NormalizerStep] = []
    private var metaspace: Metaspace?
    private var decoder: [DecoderStep]?

    var vocabularySize: Int { tokens.count }

    func token(_ id: Int32) -> [UInt8]? {
        guard id >= 0, Int(id) < tokens.count, !tokens[Int(id)].isEmpty else { return nil }
        return tokens[Int(id)]
    }

    func id(of token: [UInt8]) -> Int32? {
        vocab.value(token)
    }

    // MARK: Parsing

    init(contentsOf file: URL) throws(TokenizerError) {
        let data: Data
        do { data = try Data(contentsOf: file) } catch {
            throw TokenizerError(.unreadable, file: file, error.localizedDescription)
        }
        let root: JSONValue
        do {
            root = try JSONValue.parse([UInt8](data))
        } catch {
            throw TokenizerError(.malformed, file: file, "not valid JSON: \(error.reason)")
        }
        guard root.members != nil else {
            throw TokenizerError(.malformed, file: file, "the top level is not a JSON object")
        }
        try parse(root, file: file)
    }

    private mutating func parse(_ root: JSONValue, file: URL) throws(TokenizerError) {
        func malformed(_ reason: String) -> TokenizerError { TokenizerError(.malformed, file: file, reason) }
        func unsupported(_ reason: String) -> TokenizerError { TokenizerError(.unsupported, file: file, reason) }
        func text(_ bytes: [UInt8]) -> String { String(decoding: bytes, as: UTF8.self) }

        guard let model = root["model"], model.members != nil else { throw malformed("no \"model\" object") }
        let type = model["type"]?.string ?? "BPE"
        guard type == "BPE" else { throw unsupported("model type \(type); only BPE is implemented") }
        for key in ["continuing_subword_prefix", "end_of_word_suffix", "dropout"] {
            if let value = model[key], !value.isNull, value.string != "" {
                throw unsupported("BPE \(key) \(value)")
            }
        }
        guard let vocabMembers = model["vocab"]?.members else { throw malformed("model has no \"vocab\" object") }
        var maxID = -1
        var entries: [([UInt8], Int32)] = []
        entries.reserveCapacity(vocabMembers.count)
        for (token, value) in vocabMembers {
            guard let number = value.int, let id = Int32(exactly: number), id >= 0 else {
                throw malformed("vocab entry \"\(text(token))\" has id \(value), not a non-negative integer")
            }
            entries.append((token, id))
            maxID = max(maxID, Int(id))
        }
        var addedTokens: [AddedToken] = []
        for item in root["added_tokens"]?.array ?? [] {
            guard let content = item["content"]?.bytes, !content.isEmpty,
                  let number = item["id"]?.int, let id = Int32(exactly: number), id >= 0 else {
                throw malformed("an added token lacks content or id: \(item)")
            }
            for flag in ["lstrip", "rstrip", "single_word"] where item[flag]?.bool == true {
                throw unsupported("added token \"\(text(content))\" with \(flag)")
            }
            if item["normalized"]?.bool == true {
                throw unsupported("added token \"\(text(content))\" with normalized = true")
            }
            addedTokens.append(AddedToken(content: content, id: id, special: item["special"]?.bool ?? false))
            maxID = max(maxID, Int(id))
        }
        // The id table has one slot per id up to the largest: an id far beyond the tokens the file defines would make
        // a few bytes of JSON allocate gigabytes.
        let definedTokens = entries.count + addedTokens.count
        guard maxID < definedTokens else {
            throw malformed("token id \(maxID) lies beyond the \(definedTokens) tokens the file defines (ids run from 0 without large gaps)")
        }
        tokens = Array(repeating: [], count: maxID + 1)
        vocab = ByteTable(capacity: entries.count + addedTokens.count)
        for (token, id) in entries {
            vocab.insert(token, id, overwrite: true)
            tokens[Int(id)] = token
        }
        for token in addedTokens {
            vocab.insert(token.content, token.id, overwrite: true)
            tokens[Int(token.id)] = token.content
            if token.special { specialContents.insert(token.content) }
            added.append(token)
            addedByFirstByte[Int(token.content[0])].append(added.count - 1)
        }
        for i in 0..<256 { addedByFirstByte[i].sort { added[$0].content.count > added[$1].content.count } }

        if let unknown = model["unk_token"]?.bytes {
            guard let id = vocab.value(unknown) else { throw malformed("unk_token \"\(text(unknown))\" is not in the vocab") }
            unknownID = id
        }
        fuseUnknown = model["fuse_unk"]?.bool ?? false
        byteFallback = model["byte_fallback"]?.bool ?? false
        ignoreMerges = model["ignore_merges"]?.bool ?? false
        byteIDs = (0...255).map { vocab.value(UTF8Bytes.byteFallbackPiece(UInt8($0))) }

        guard let mergeList = model["merges"]?.array else { throw malformed("model has no \"merges\" list") }
        merges.reserveCapacity(mergeList.count)
        for (rank, item) in mergeList.enumerated() {
            let pair: [[UInt8]]
            if let joined = item.bytes {
                pair = joined.split(separator: 0x20, omittingEmptySubsequences: false).map(Array.init)
            } else if let array = item.array {
                pair = array.compactMap(\.bytes)
            } else {
                throw malformed("merge \(rank) is neither \"a b\" nor [\"a\", \"b\"]")
            }
            guard pair.count == 2 else { throw malformed("merge \(rank) \(item) does not have two parts") }
            guard let l = vocab.value(pair[0]), let r = vocab.value(pair[1]), let m = vocab.value(pair[0] + pair[1]) else {
                throw malformed("merge \(rank) \"\(text(pair[0])) \(text(pair[1]))\" uses a token that is not in the vocab")
            }
            merges[UInt64(UInt32(l)) << 32 | UInt64(UInt32(r))] = (Int32(rank), m)
        }

        try parseNormalizer(root["normalizer"], file: file)
        try parsePreTokenizer(root["pre_tokenizer"], file: file)
        try parseDecoder(root["decoder"], file: file)
    }

    private static func stringPattern(_ value: JSONValue?) -> [UInt8]? {
        value?.bytes ?? value?["String"]?.bytes
    }

    private mutating func parseNormalizer(_ value: JSONValue?, file: URL) throws(TokenizerError) {
        guard let object = value, object.members != nil else { return }
        let type = object["type"]?.string ?? "?"
        switch type {
        case "Sequence":
            for item in object["normalizers"]?.array ?? [] { try parseNormalizer(item, file: file) }
        case "Prepend":
            guard let prepend = object["prepend"]?.bytes else {
                throw TokenizerError(.malformed, file: file, "Prepend normalizer without \"prepend\"")
            }
            normalizer.append(.prepend(prepend))
        case "Replace":
            guard let pattern = Self.stringPattern(object["pattern"]), let content = object["content"]?.bytes else {
                throw TokenizerError(.unsupported, file: file, "Replace normalizer with a regex or missing pattern")
            }
            normalizer.append(.replace(pattern, content))
        default:
            throw TokenizerError(.unsupported, file: file, "normalizer \(type)")
        }
    }

    private mutating func parsePreTokenizer(_ value: JSONValue?, file: URL) throws(TokenizerError) {
        guard let object = value, object.members != nil else { return }
        let type = object["type"]?.string ?? "?"
        if type == "Sequence", let items = object["pretokenizers"]?.array, items.count <= 1 {
            if let item = items.first { try parsePreTokenizer(item, file: file) }
            return
        }
        guard type == "Metaspace", metaspace == nil else {
            throw TokenizerError(.unsupported, file: file, "pre-tokenizer \(type)")
        }
        guard let replacement = object["replacement"]?.bytes,
              String(decoding: replacement, as: UTF8.self).unicodeScalars.count == 1 else {
            throw TokenizerError(.malformed, file: file, "Metaspace pre-tokenizer without a one-character replacement")
        }
        let scheme: PrependScheme
        switch object["prepend_scheme"]?.string {
        case "always": scheme = .always
        case "first": scheme = .first
        case "never": scheme = .never
        case nil: scheme = object["add_prefix_space"]?.bool ?? true ? .always : .never
        case let other?: throw TokenizerError(.unsupported, file: file, "Metaspace prepend_scheme \(other)")
        }
        metaspace = Metaspace(replacement: replacement, prependScheme: scheme, split: object["split"]?.bool ?? true)
    }

    private mutating func parseDecoder(_ value: JSONValue?, file: URL) throws(TokenizerError) {
        guard let object = value, object.members != nil else { return }
        let type = object["type"]?.string ?? "?"
        var steps = decoder ?? []
        switch type {
        case "Sequence":
            decoder = steps
            for item in object["decoders"]?.array ?? [] { try parseDecoder(item, file: file) }
            return
        case "Replace":
            guard let pattern = Self.stringPattern(object["pattern"]), let content = object["content"]?.bytes else {
                throw TokenizerError(.unsupported, file: file, "Replace decoder with a regex or missing pattern")
            }
            steps.append(.replace(pattern, content))
        case "ByteFallback": steps.append(.byteFallback)
        case "Fuse": steps.append(.fuse)
        case "Strip":
            guard let content = object["content"]?.string?.unicodeScalars, content.count == 1 else {
                throw TokenizerError(.malformed, file: file, "Strip decoder without a one-character content")
            }
            steps.append(.strip(content: content.first!, start: object["start"]?.int ?? 0, stop: object["stop"]?.int ?? 0))
        default:
            throw TokenizerError(.unsupported, file: file, "decoder \(type)")
        }
        decoder = steps
    }

    // MARK: Encoding

    /// `Tokenizer.encode(text, add_special_tokens=False).ids`.
    func encode(_ text: [UInt8]) -> [Int32] {
        var ids: [Int32] = []
        var segmentStart = 0
        var offset = 0
        while offset < text.count {
            if let token = addedTokenMatch(text, at: offset) {
                if segmentStart < offset {
                    encodeSegment(Array(text[segmentStart..<offset]), isFirst: segmentStart == 0, addPrefix: true, into: &ids)
                }
                ids.append(token.id)
                offset += token.content.count
                segmentStart = offset
            } else {
                offset += 1
            }
        }
        if segmentStart < text.count {
            encodeSegment(Array(text[segmentStart...]), isFirst: segmentStart == 0, addPrefix: true, into: &ids)
        }
        return ids
    }

    /// The normalizer, pre-tokenizer and model on `text` without added-token splitting, and without
    /// any prefix when `addPrefix` is false (used to reproduce the slow LlamaTokenizer).
    func encodeWithoutAddedTokens(_ text: [UInt8], addPrefix: Bool) -> [Int32] {
        var ids: [Int32] = []
        if !text.isEmpty { encodeSegment(text, isFirst: true, addPrefix: addPrefix, into: &ids) }
        return ids
    }

    /// Leftmost-longest match of an added token at `offset`.
    private func addedTokenMatch(_ text: [UInt8], at offset: Int) -> AddedToken? {
        for index in addedByFirstByte[Int(text[offset])] where UTF8Bytes.hasPrefix(text, added[index].content, at: offset) {
            return added[index]
        }
        return nil
    }

    private func encodeSegment(_ segment: [UInt8], isFirst: Bool, addPrefix: Bool, into ids: inout [Int32]) {
        var text = segment
        for step in normalizer {
            switch step {
            case .prepend(let prefix): if addPrefix, !text.isEmpty { text = prefix + text }
            case .replace(let pattern, let content): text = UTF8Bytes.replacing(pattern, with: content, in: text)
            }
        }
        guard !text.isEmpty else { return }
        guard let metaspace else {
            encodeWord(text, into: &ids)
            return
        }
        text = UTF8Bytes.replacing([0x20], with: metaspace.replacement, in: text)
        if addPrefix, !UTF8Bytes.hasPrefix(text, metaspace.replacement) {
            switch metaspace.prependScheme {
            case .always: text = metaspace.replacement + text
            case .first: if isFirst { text = metaspace.replacement + text }
            case .never: break
            }
        }
        guard metaspace.split else {
            encodeWord(text, into: &ids)
            return
        }
        // Split before every replacement character (the character stays with what follows).
        var start = 0
        var i = 1
        while i < text.count {
            if UTF8Bytes.hasPrefix(text, metaspace.replacement, at: i) {
                encodeWord(Array(text[start..<i]), into: &ids)
                start = i
                i += metaspace.replacement.count
            } else {
                i += 1
            }
        }
        encodeWord(Array(text[start...]), into: &ids)
    }

    private struct Symbol {
        var id: Int32
        var previous: Int
        var next: Int
        var length: Int
    }

    /// A possible merge at `position` and its right neighbour. Greater means merged first: the
    /// lowest rank, then the leftmost position.
    private struct Merge: Comparable {
        var position: Int
        var rank: Int32
        var id: Int32

        static func < (a: Merge, b: Merge) -> Bool {
            a.rank > b.rank || (a.rank == b.rank && a.position > b.position)
        }
    }

    private func mergeKey(_ left: Int32, _ right: Int32) -> UInt64 {
        UInt64(UInt32(left)) << 32 | UInt64(UInt32(right))
    }

    /// The BPE model on one pre-token: characters (with byte fallback or unknown), then merges by
    /// lowest rank, leftmost first.
    private func encodeWord(_ word: [UInt8], into ids: inout [Int32]) {
        if word.isEmpty { return }
        if ignoreMerges, let id = vocab.value(word) {
            ids.append(id)
            return
        }
        var symbols: [Symbol] = []
        symbols.reserveCapacity(word.count)
        func add(_ id: Int32, _ length: Int) {
            let index = symbols.count
            if index > 0 { symbols[index - 1].next = index }
            symbols.append(Symbol(id: id, previous: index - 1, next: -1, length: length))
        }
        var pendingUnknown: (id: Int32, length: Int)?
        word.withUnsafeBufferPointer { buffer in
            var offset = 0
            while offset < buffer.count {
                let length = min(UTF8Bytes.sequenceLength(buffer[offset]), buffer.count - offset)
                let character = UnsafeBufferPointer(rebasing: buffer[offset..<(offset + length)])
                offset += length
                if let id = vocab.value(character) {
                    if let unknown = pendingUnknown {
                        add(unknown.id, unknown.length)
                        pendingUnknown = nil
                    }
                    add(id, length)
                    continue
                }
                if byteFallback {
                    let bytes = character.map { byteIDs[Int($0)] }
                    if bytes.allSatisfy({ $0 != nil }) {
                        for id in bytes { add(id!, 1) }
                        continue
                    }
                }
                if let unknownID {
                    if let unknown = pendingUnknown {
                        if fuseUnknown {
                            pendingUnknown = (unknown.id, unknown.length + length)
                            continue
                        }
                        add(unknown.id, unknown.length)
                    }
                    pendingUnknown = (unknownID, length)
                }
            }
        }
        if let unknown = pendingUnknown { add(unknown.id, unknown.length) }
        if symbols.isEmpty { return }

        var queue = Heap<Merge>(reserving: symbols.count)
        for i in 1..<max(symbols.count, 1) {
            if let merge = merges[mergeKey(symbols[i - 1].id, symbols[i].id)] {
                queue.push(Merge(position: i - 1, rank: merge.rank, id: merge.id))
            }
        }
        while let top = queue.pop() {
            let current = symbols[top.position]
            guard current.length > 0, current.next >= 0 else { continue }
            let nextIndex = current.next
            let right = symbols[nextIndex]
            guard let merge = merges[mergeKey(current.id, right.id)], merge.id == top.id else { continue }
            symbols[top.position].id = top.id
            symbols[top.position].length += right.length
            symbols[top.position].next = right.next
            symbols[nextIndex].length = 0
            if right.next >= 0 { symbols[right.next].previous = top.position }
            let merged = symbols[top.position]
            if merged.previous >= 0, let m = merges[mergeKey(symbols[merged.previous].id, merged.id)] {
                queue.push(Merge(position: merged.previous, rank: m.rank, id: m.id))
            }
            if merged.next >= 0, let m = merges[mergeKey(merged.id, symbols[merged.next].id)] {
                queue.push(Merge(position: top.position, rank: m.rank, id: m.id))
            }
        }
        for symbol in symbols where symbol.length > 0 { ids.append(symbol.id) }
    }

    // MARK: Decoding

    /// `Tokenizer.decode(ids)` with `skip_special_tokens=True` (the Python default): special
    /// added tokens and unknown ids are skipped, then the decoder chain runs.
    func decode(_ ids: [Int32]) -> String {
        var pieces: [[UInt8]] = []
        for id in ids {
            guard let token = token(id), !specialContents.contains(token) else { continue }
            pieces.append(token)
        }
        guard let decoder else {
            return pieces.map { String(decoding: $0, as: UTF8.self) }.joined(separator: " ")
        }
        for step in decoder {
            switch step {
            case .replace(let pattern, let content):
                pieces = pieces.map { UTF8Bytes.replacing(pattern, with: content, in: $0) }
            case .fuse:
                pieces = [pieces.flatMap { $0 }]
            case .byteFallback:
                pieces = Self.byteFallbackDecode(pieces)
            case .strip(let content, let start, let stop):
                pieces = pieces.map { piece in
                    var scalars = Array(String(decoding: piece, as: UTF8.self).unicodeScalars)
                    var cutStart = 0
                    while cutStart < min(start, scalars.count), scalars[cutStart] == content { cutStart += 1 }
                    var cutStop = scalars.count
                    while scalars.count - cutStop < stop, cutStop > cutStart, scalars[cutStop - 1] == content { cutStop -= 1 }
                    scalars = Array(scalars[cutStart..<cutStop])
                    var text = String.UnicodeScalarView()
                    text.append(contentsOf: scalars)
                    return Array(String(text).utf8)
                }
            }
        }
        return String(decoding: pieces.flatMap { $0 }, as: UTF8.self)
    }

    /// Runs of `<0xNN>` tokens become their bytes when those form valid UTF-8, otherwise one
    /// U+FFFD per byte (tokenizers' ByteFallback decoder).
    private static func byteFallbackDecode(_ pieces: [[UInt8]]) -> [[UInt8]] {
        var out: [[UInt8]] = []
        var bytes: [UInt8] = []
        func flush() {
            guard !bytes.isEmpty else { return }
            if UTF8Bytes.isValid(bytes) {
                out.append(bytes)
            } else {
                out.append(contentsOf: Array(repeating: UTF8Bytes.replacementCharacter, count: bytes.count))
            }
            bytes.removeAll()
        }
        for piece in pieces {
            if let byte = hexByteToken(piece) {
                bytes.append(byte)
            } else {
                flush()
                out.append(piece)
            }
        }
        flush()
        return out
    }

    /// A token of exactly six bytes `<0x..>` whose middle parses as Rust's `u8::from_str_radix(_, 16)`.
    private static func hexByteToken(_ piece: [UInt8]) -> UInt8? {
        guard piece.count == 6, UTF8Bytes.hasPrefix(piece, Array("<0x".utf8)), piece[5] == UInt8(ascii: ">") else {
            return nil
        }
        if piece[3] == UInt8(ascii: "+") { return UTF8Bytes.hexDigit(piece[4]) }
        guard let high = UTF8Bytes.hexDigit(piece[3]), let low = UTF8Bytes.hexDigit(piece[4]) else { return nil }
        return high << 4 | low
    }
}
