import Foundation

/// A sentencepiece BPE model read from `tokenizer.model` (a serialized `ModelProto`), encoding and
/// decoding the way the `sentencepiece` library does (bpe_model.cc, normalizer.cc and
/// sentencepiece_processor.cc, as of sentencepiece 0.2).
struct SentencePieceModel: Sendable {
    enum PieceType: Int32, Sendable {
        case normal = 1, unknown = 2, control = 3, userDefined = 4, unused = 5, byte = 6
    }

    struct Piece: Sendable {
        var bytes: [UInt8]
        var score: Float
        var type: PieceType
    }

    private(set) var pieces: [Piece] = []
    /// NORMAL, USER_DEFINED and UNUSED pieces: the ones merges may produce (`pieces_`).
    private var mergeable = ByteTable(capacity: 0)
    /// The other pieces (UNKNOWN, CONTROL, BYTE), looked up first by `id(of:)`.
    private var reserved = ByteTable(capacity: 0)
    /// User-defined pieces grouped by first byte, longest first: matched before any merge.
    private var userDefined: [[[UInt8]]] = Array(repeating: [], count: 256)
    /// Byte-fallback piece id for each byte value, or the unknown id where the model lacks it.
    private var byteIDs: [Int32] = []

    private(set) var unknownID: Int32 = 0
    private(set) var bosID: Int32 = 1
    private(set) var eosID: Int32 = 2
    private(set) var padID: Int32 = -1
    private(set) var byteFallback = false
    private var unknownSurface: [UInt8] = Array(" \u{2047} ".utf8)
    private(set) var addDummyPrefix = true
    private var removeExtraWhitespaces = true
    private var escapeWhitespaces = true

    init(contentsOf file: URL) throws(TokenizerError) {
        let data: Data
        do { data = try Data(contentsOf: file) } catch {
            throw TokenizerError(.unreadable, file: file, error.localizedDescription)
        }
        do { try parse([UInt8](data), file: file) } catch let failure as ProtobufReader.Failure {
            throw TokenizerError(.malformed, file: file, failure.reason)
        } catch let error as TokenizerError {
            throw error
        } catch {
            throw TokenizerError(.malformed, file: file, "\(error)")
        }
    }

    // MARK: Parsing

    private mutating func parse(_ bytes: [UInt8], file: URL) throws {
        var reader = ProtobufReader(bytes: bytes)
        var modelType: Int32 = 1  // UNIGRAM is the proto default
        var charsmap: [UInt8] = []
        var sawTrainerSpec = false, sawNormalizerSpec = false
        var treatWhitespaceAsSuffix = false
        while let field = try reader.nextField() {
            switch (field.number, field.wireType) {
            case (1, .lengthDelimited):
                var message = try reader.message()
                var piece = Piece(bytes: [], score: 0, type: .normal)
                while let f = try message.nextField() {
                    switch (f.number, f.wireType) {
                    case (1, .lengthDelimited): piece.bytes = try message.string()
                    case (2, .fixed32): piece.score = try message.float()
                    case (3, .varint):
                        let raw = try message.int32()
                        guard let type = PieceType(rawValue: raw) else {
                            throw TokenizerError(.malformed, file: file, "piece \(pieces.count) has unknown type \(raw)")
                        }
                        piece.type = type
                    default: try message.skip(f.wireType)
                    }
                }
                pieces.append(piece)
            case (2, .lengthDelimited):
                sawTrainerSpec = true
                var message = try reader.message()
                while let f = try message.nextField() {
                    switch (f.number, f.wireType) {
                    case (3, .varint): modelType = try message.int32()
                    case (24, .varint): treatWhitespaceAsSuffix = try message.bool()
                    case (35, .varint): byteFallback = try message.bool()
                    case (40, .varint): unknownID = try message.int32()
                    case (41, .varint): bosID = try message.int32()
                    case (42, .varint): eosID = try message.int32()
                    case (43, .varint): padID = try message.int32()
                    case (44, .lengthDelimited): unknownSurface = try message.string()
                    default: try message.skip(f.wireType)
                    }
                }
            case (3, .lengthDelimited):
                sawNormalizerSpec = true
                var message = try reader.message()
                while let f = try message.nextField() {
                    switch (f.number, f.wireType) {
                    case (2, .lengthDelimited): charsmap = try message.string()
                    case (3, .varint): addDummyPrefix = try message.bool()
                    case (4, .varint): removeExtraWhitespaces = try message.bool()
                    case (5, .varint): escapeWhitespaces = try message.bool()
                    default: try message.skip(f.wireType)
                    }
                }
            default:
                try reader.skip(field.wireType)
            }
        }

        guard !pieces.isEmpty else {
            throw TokenizerError(.malformed, file: file, "no pieces (an empty or non-sentencepiece file)")
        }
        guard sawTrainerSpec, sawNormalizerSpec else {
            throw TokenizerError(.malformed, file: file, "missing \(sawTrainerSpec ? "normalizer_spec" : "trainer_spec")")
        }
        let typeNames: [Int32: String] = [1: "unigram", 2: "bpe", 3: "word", 4: "char"]
        guard modelType == 2 else {
            throw TokenizerError(.unsupported, file: file,
                                 "model type \(typeNames[modelType] ?? String(modelType)); only BPE is implemented")
        }
        guard charsmap.isEmpty else {
            throw TokenizerError(.unsupported, file: file,
                                 "a precompiled normalization charsmap (\(charsmap.count) bytes); only identity normalization is implemented")
        }
        guard !treatWhitespaceAsSuffix else {
            throw TokenizerError(.unsupported, file: file, "treat_whitespace_as_suffix")
        }

        mergeable = ByteTable(capacity: pieces.count)
        reserved = ByteTable(capacity: 300)
        var unknownPieces: [Int32] = []
        for (index, piece) in pieces.enumerated() {
            let id = Int32(index)
            guard !piece.bytes.isEmpty else {
                throw TokenizerError(.malformed, file: file, "piece \(id) is empty")
            }
            let inserted: Bool
            switch piece.type {
            case .normal, .userDefined, .unused: inserted = mergeable.insert(piece.bytes, id)
            case .unknown, .control, .byte: inserted = reserved.insert(piece.bytes, id)
            }
            guard inserted else {
                throw TokenizerError(.malformed, file: file,
                                     "piece \(id) \"\(String(decoding: piece.bytes, as: UTF8.self))\" is defined twice")
            }
            if piece.type == .userDefined { userDefined[Int(piece.bytes[0])].append(piece.bytes) }
            if piece.type == .unknown { unknownPieces.append(id) }
            if piece.type == .byte, UTF8Bytes.byteFallbackValue(piece.bytes) == nil {
                throw TokenizerError(.malformed, file: file, "byte piece \(id) is not of the form <0xNN>")
            }
        }
        for i in 0..<256 { userDefined[i].sort { $0.count > $1.count } }
        guard unknownPieces.count == 1, unknownPieces[0] == unknownID else {
            throw TokenizerError(.malformed, file: file,
                                 "expected exactly one UNKNOWN piece, at unk_id \(unknownID); found \(unknownPieces)")
        }
        for (name, id) in [("bos_id", bosID), ("eos_id", eosID), ("pad_id", padID)] where id >= pieces.count {
            throw TokenizerError(.malformed, file: file, "\(name) \(id) is outside the vocabulary of \(pieces.count)")
        }
        byteIDs = (0...255).map { id(of: UTF8Bytes.byteFallbackPiece(UInt8($0))) }
        if byteFallback, let missing = byteIDs.firstIndex(of: unknownID) {
            throw TokenizerError(.malformed, file: file, "byte_fallback is on but the piece for byte \(missing) is missing")
        }
    }

    // MARK: Lookup

    /// `PieceToId`: reserved pieces first, then mergeable ones, else the unknown id.
    func id(of piece: [UInt8]) -> Int32 {
        piece.withUnsafeBufferPointer { id(of: $0) }
    }

    func id(of piece: UnsafeBufferPointer<UInt8>) -> Int32 {
        reserved.value(piece) ?? mergeable.value(piece) ?? unknownID
    }

    /// Length of the longest user-defined piece at `offset`, or 0.
    private func userDefinedMatch(_ bytes: UnsafeBufferPointer<UInt8>, at offset: Int) -> Int {
        for candidate in userDefined[Int(bytes[offset])] where bytes.count - offset >= candidate.count {
            var equal = true
            for i in 1..<candidate.count where bytes[offset + i] != candidate[i] {
                equal = false
                break
            }
            if equal { return candidate.count }
        }
        return 0
    }

    // MARK: Encoding

    /// sentencepiece's normalizer with identity normalization: optional removal of leading,
    /// trailing and repeated spaces, the dummy prefix, and spaces escaped as U+2581.
    func normalize(_ input: [UInt8], addDummyPrefix: Bool) -> [UInt8] {
        input.withUnsafeBufferPointer { input in
            var offset = 0
            if removeExtraWhitespaces {
                while offset < input.count, input[offset] == 0x20 { offset += 1 }
            }
            if offset == input.count { return [] }
            var out: [UInt8] = []
            out.reserveCapacity(input.count * 2 + 3)
            if addDummyPrefix { out.append(contentsOf: escapeWhitespaces ? UTF8Bytes.metaspace : [0x20]) }
            var previousWasSpace = removeExtraWhitespaces
            while offset < input.count {
                // One "prefix": a whole user-defined piece or one character.
                let matched = userDefinedMatch(input, at: offset)
                let length = matched > 0 ? matched : min(UTF8Bytes.sequenceLength(input[offset]), input.count - offset)
                var start = offset
                let end = offset + length
                while previousWasSpace, start < end, input[start] == 0x20 { start += 1 }
                if start < end {
                    for i in start..<end {
                        if escapeWhitespaces, input[i] == 0x20 {
                            out.append(contentsOf: UTF8Bytes.metaspace)
                        } else {
                            out.append(input[i])
                        }
                    }
                    previousWasSpace = input[end - 1] == 0x20
                }
                offset = end
                if !removeExtraWhitespaces { previousWasSpace = false }
            }
            if removeExtraWhitespaces {
                let space: [UInt8] = escapeWhitespaces ? UTF8Bytes.metaspace : [0x20]
                while out.count >= space.count, Array(out.suffix(space.count)) == space {
                    out.removeLast(space.count)
                }
            }
            return out
        }
    }

    private struct Symbol {
        var start: Int
        var length: Int
        var previous: Int
        var next: Int
        var frozen: Bool
    }

    /// A possible merge of two adjacent symbols. Greater means merged first: the higher score,
    /// then the leftmost pair.
    private struct Candidate: Comparable {
        var score: Float
        var left: Int
        var right: Int
        var length: Int

        static func < (a: Candidate, b: Candidate) -> Bool {
            a.score < b.score || (a.score == b.score && a.left > b.left)
        }
    }

    /// Ids for `text`: normalization, BPE merges by piece score (user-defined pieces frozen),
    /// re-segmentation of unused pieces, then byte fallback or merged unknown runs. No BOS/EOS.
    func encode(_ text: [UInt8], addDummyPrefix: Bool) -> [Int32] {
        let normalized = normalize(text, addDummyPrefix: addDummyPrefix)
        if normalized.isEmpty { return [] }
        return normalized.withUnsafeBufferPointer { buffer -> [Int32] in
            var symbols: [Symbol] = []
            symbols.reserveCapacity(buffer.count)
            var offset = 0
            while offset < buffer.count {
                let matched = userDefinedMatch(buffer, at: offset)
                let length = matched > 0 ? matched : min(UTF8Bytes.sequenceLength(buffer[offset]), buffer.count - offset)
                let index = symbols.count
                symbols.append(Symbol(start: offset, length: length, previous: index - 1,
                                      next: offset + length < buffer.count ? index + 1 : -1, frozen: matched > 0))
                offset += length
            }

            var agenda = Heap<Candidate>(reserving: symbols.count)
            var reverseMerges: [[UInt8]: ([UInt8], [UInt8])] = [:]
            func consider(_ left: Int, _ right: Int) {
                guard left >= 0, right >= 0, !symbols[left].frozen, !symbols[right].frozen else { return }
                let start = symbols[left].start
                let length = symbols[left].length + symbols[right].length
                let merged = UnsafeBufferPointer(rebasing: buffer[start..<(start + length)])
                guard let id = mergeable.value(merged) else { return }
                let piece = pieces[Int(id)]
                agenda.push(Candidate(score: piece.score, left: left, right: right, length: length))
                if piece.type == .unused {
                    let leftEnd = start + symbols[left].length
                    reverseMerges[Array(merged)] = (Array(buffer[start..<leftEnd]), Array(buffer[leftEnd..<(start + length)]))
                }
            }
            for i in 1..<symbols.count { consider(i - 1, i) }

            while let top = agenda.pop() {
                let left = symbols[top.left], right = symbols[top.right]
                guard left.length > 0, right.length > 0, left.length + right.length == top.length else { continue }
                symbols[top.left].length += right.length
                symbols[top.left].next = right.next
                if right.next >= 0 { symbols[right.next].previous = top.left }
                symbols[top.right].length = 0
                consider(left.previous, top.left)
                consider(top.left, right.next)
            }

            var ids: [Int32] = []
            ids.reserveCapacity(symbols.count)
            var previousWasUnknown = false
            func emit(_ piece: UnsafeBufferPointer<UInt8>) {
                let id = self.id(of: piece)
                if id == unknownID {
                    if byteFallback {
                        for byte in piece { ids.append(byteIDs[Int(byte)]) }
                    } else if !previousWasUnknown {
                        ids.append(id)  // a run of unknown pieces becomes one unknown id
                    }
                    previousWasUnknown = true
                } else {
                    ids.append(id)
                    previousWasUnknown = false
                }
            }
            func resegment(_ piece: [UInt8]) {
                let id = self.id(of: piece)
                if pieces[Int(id)].type == .unused, let (l, r) = reverseMerges[piece] {
                    resegment(l)
                    resegment(r)
                } else {
                    piece.withUnsafeBufferPointer { emit($0) }
                }
            }
            var index = 0
            while index >= 0 {
                let symbol = symbols[index]
                let piece = UnsafeBufferPointer(rebasing: buffer[symbol.start..<(symbol.start + symbol.length)])
                if reverseMerges.isEmpty {
                    emit(piece)
                } else {
                    resegment(Array(piece))
                }
                index = symbol.next
            }
            return ids
        }
    }

    // MARK: Decoding

    /// sentencepiece's `DecodeIds`: control pieces vanish, the unknown piece shows its surface,
    /// runs of byte pieces are re-assembled (each invalid byte becomes U+FFFD), U+2581 becomes a
    /// space, and one leading U+2581 of the first piece that shows anything is dropped (the dummy
    /// prefix).
    /// Ids outside the vocabulary are skipped.
    func decode(_ ids: [Int32]) -> String {
        var out: [UInt8] = []
        var pendingBytes: [UInt8] = []
        var expectingBOSWhitespace = true
        func flushBytes() {
            var offset = 0
            while offset < pendingBytes.count {
                if let length = UTF8Bytes.validCharacterLength(pendingBytes, at: offset) {
                    out.append(contentsOf: pendingBytes[offset..<(offset + length)])
                    offset += length
                } else {
                    out.append(contentsOf: UTF8Bytes.replacementCharacter)
                    offset += 1
                }
            }
            if !pendingBytes.isEmpty { expectingBOSWhitespace = false }
            pendingBytes.removeAll(keepingCapacity: true)
        }
        for id in ids {
            guard id >= 0, Int(id) < pieces.count else { continue }
            let piece = pieces[Int(id)]
            if piece.type == .byte {
                pendingBytes.append(UTF8Bytes.byteFallbackValue(piece.bytes)!)
                continue
            }
            flushBytes()
            switch piece.type {
            case .control:
                continue
            case .unknown:
                out.append(contentsOf: unknownSurface)
                if !unknownSurface.isEmpty { expectingBOSWhitespace = false }
            default:
                var start = 0
                var hadBOSWhitespace = false
                if expectingBOSWhitespace, addDummyPrefix || removeExtraWhitespaces {
                    if UTF8Bytes.hasPrefix(piece.bytes, UTF8Bytes.metaspace) {
                        start = 3
                        hadBOSWhitespace = true
                    }
                }
                let decoded = UTF8Bytes.replacing(UTF8Bytes.metaspace, with: [0x20], in: Array(piece.bytes[start...]))
                out.append(contentsOf: decoded)
                if hadBOSWhitespace || !decoded.isEmpty { expectingBOSWhitespace = false }
            }
        }
        flushBytes()
        return String(decoding: out, as: UTF8.self)
    }
}
