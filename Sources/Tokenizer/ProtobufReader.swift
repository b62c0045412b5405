import Foundation

/// A reader for the protobuf wire format, just enough for sentencepiece's `ModelProto`.
/// Every read is bounds-checked; running past the end of a message is a "truncated" error.
struct ProtobufReader {
    enum WireType: UInt64 {
        case varint = 0, fixed64 = 1, lengthDelimited = 2, startGroup = 3, endGroup = 4, fixed32 = 5
    }

    struct Failure: Error {
        let reason: String
    }

    private let bytes: [UInt8]
    private(set) var position: Int
    private let end: Int

    init(bytes: [UInt8], range: Range<Int>? = nil) {
        self.bytes = bytes
        self.position = range?.lowerBound ?? 0
        self.end = range?.upperBound ?? bytes.count
    }

    var isAtEnd: Bool { position >= end }

    /// The next field's number and wire type, or nil at the end of the message.
    mutating func nextField() throws(Failure) -> (number: Int, wireType: WireType)? {
        if isAtEnd { return nil }
        let at = position
        let key = try varint()
        guard let wireType = WireType(rawValue: key & 7) else {
            throw Failure(reason: "invalid wire type \(key & 7) at byte \(at)")
        }
        let number = key >> 3
        guard number >= 1, number <= 536_870_911 else {
            throw Failure(reason: "invalid field number \(number) at byte \(at)")
        }
        return (Int(number), wireType)
    }

    mutating func varint() throws(Failure) -> UInt64 {
        var result: UInt64 = 0
        var shift: UInt64 = 0
        while true {
            guard position < end else { throw Failure(reason: "truncated protobuf (varint runs past the end)") }
            let byte = bytes[position]
            position += 1
            if shift == 63, byte > 1 { throw Failure(reason: "varint overflows 64 bits at byte \(position - 1)") }
            result |= UInt64(byte & 0x7F) << shift
            if byte & 0x80 == 0 { return result }
            shift += 7
            if shift > 63 { throw Failure(reason: "varint longer than 10 bytes at byte \(position - 1)") }
        }
    }

    /// An `int32` field: negative values are sign-extended 10-byte varints.
    mutating func int32() throws(Failure) -> Int32 {
        Int32(truncatingIfNeeded: Int64(bitPattern: try varint()))
    }

    mutating func bool() throws(Failure) -> Bool { try varint() != 0 }

    mutating func float() throws(Failure) -> Float {
        guard end - position >= 4 else { throw Failure(reason: "truncated protobuf (fixed32 runs past the end)") }
        var bits: UInt32 = 0
        for i in 0..<4 { bits |= UInt32(bytes[position + i]) << (8 * UInt32(i)) }
        position += 4
        return Float(bitPattern: bits)
    }

    /// The byte range of a length-delimited field (string, bytes, sub-message).
    mutating func lengthDelimited() throws(Failure) -> Range<Int> {
        let length = try varint()
        guard length <= UInt64(end - position) else {
            throw Failure(reason: "truncated protobuf (a field of \(length) bytes runs past the end at byte \(position))")
        }
        let start = position
        position += Int(length)
        return start..<position
    }

    mutating func string() throws(Failure) -> [UInt8] {
        Array(bytes[try lengthDelimited()])
    }

    mutating func message() throws(Failure) -> ProtobufReader {
        ProtobufReader(bytes: bytes, range: try lengthDelimited())
    }

    mutating func skip(_ wireType: WireType) throws(Failure) {
        switch wireType {
        case .varint: _ = try varint()
        case .fixed64:
            guard end - position >= 8 else { throw Failure(reason: "truncated protobuf (fixed64 runs past the end)") }
            position += 8
        case .fixed32:
            guard end - position >= 4 else { throw Failure(reason: "truncated protobuf (fixed32 runs past the end)") }
            position += 4
        case .lengthDelimited: _ = try lengthDelimited()
        case .startGroup, .endGroup:
            throw Failure(reason: "protobuf groups are not used by sentencepiece (byte \(position))")
        }
    }
}
