import Crypto
import Foundation

/// What a snapshot belongs to: the model (by content) and the one job, of one queue, that wrote it, with the
/// inputs that job asked for. A snapshot is resumed only by the job it names, and only while all of these still
/// hold, so a reused id, a second queue sharing an output folder, a swapped file, a changed image or a retrained
/// model can never hand one job another's state.
public struct SnapshotIdentity: Sendable, Hashable {
    /// The model's content fingerprint (`ModelFingerprint.fingerprint`).
    public var model: String
    /// The queue's identity (a UUID) and the job's id in it.
    public var queue: String
    public var job: Int64
    /// sha256 (hex) of the image bytes the job was enqueued with.
    public var imageSHA256: String
    public var prompt: String
    /// The job's generation parameters as canonical JSON.
    public var parameters: String

    public init(model: String, queue: String, job: Int64, imageSHA256: String, prompt: String, parameters: String) {
        self.model = model
        self.queue = queue
        self.job = job
        self.imageSHA256 = imageSHA256
        self.prompt = prompt
        self.parameters = parameters
    }

    /// Why a snapshot with this identity cannot be resumed by `expected`, or nil when it can. The model is checked
    /// apart (`SnapshotFileError.differentModel`).
    func mismatch(expected: SnapshotIdentity) -> String? {
        if queue != expected.queue || job != expected.job {
            return "it was written for job \(job) of queue \(queue), not job \(expected.job) of queue \(expected.queue)"
        }
        if imageSHA256 != expected.imageSHA256 {
            return "it was taken for an image with sha256 \(imageSHA256), the job's image has \(expected.imageSHA256)"
        }
        if prompt != expected.prompt { return "it was taken for another prompt" }
        if parameters != expected.parameters { return "it was taken with parameters \(parameters), the job asks for \(expected.parameters)" }
        return nil
    }
}

/// One frame of a snapshot: a piece of an engine's state (opaque here) with what `snapshot inspect` and the
/// writer need to know of it.
public struct SnapshotFrame: Sendable, Equatable {
    /// `full` frames hold the whole state and replace everything before them; `append` frames hold the K/V cells
    /// added since the frame before and the rest of the state (tokens, sampler) whole.
    public enum Kind: UInt8, Sendable, CustomStringConvertible {
        case full = 1
        case append = 2

        public var description: String { self == .full ? "full" : "append" }
    }

    public var kind: Kind
    /// Decode steps the state had run when the frame was taken.
    public var decodeSteps: Int
    /// K/V cells the frame carries, all layers together.
    public var cells: Int
    /// The engine's bytes, uncompressed.
    public var payload: Data
    /// Bytes of a full frame's payload for the same state (the live size), for the writer's compaction rule.
    public var stateBytes: Int

    public init(kind: Kind, decodeSteps: Int, cells: Int, payload: Data, stateBytes: Int) {
        self.kind = kind
        self.decodeSteps = decodeSteps
        self.cells = cells
        self.payload = payload
        self.stateBytes = stateBytes
    }
}

/// The most a job's snapshot can hold, from the model and context that will resume it. A reader checks every frame's
/// declared cells and decoded size against these before it decompresses anything, decompresses no frame past the size
/// it declares, and refuses (`SnapshotFileError.tooLarge`) a snapshot that declares more than its job could ever
/// have written, so a few kilobytes of crafted file cannot make it allocate gigabytes.
public struct SnapshotLimits: Sendable, Equatable {
    /// K/V cells the live state can hold, all layers together: layers x context length.
    public var maxCells: Int
    /// Payload bytes of one cell: its position and its key and value rows (2 x K/V width x element size + 4).
    public var cellBytes: Int
    /// Payload bytes of everything in one frame but its cells: tokens, sampler, parameters and result, per-layer counts.
    public var otherBytes: Int

    /// The largest sum of the decoded payloads of the frames a state is made of (the last full frame and the append
    /// frames after it).
    public var maxFramesBytes: Int

    /// Bounds for a model whose state holds at most `maxCells` cells of `cellBytes` bytes and `otherBytes` of the
    /// rest. The frames of one state may decode to twice the largest state: the writer rewrites a snapshot as one
    /// full frame before its frames pass twice the live state.
    public init(maxCells: Int, cellBytes: Int, otherBytes: Int) {
        self.maxCells = max(0, maxCells)
        self.cellBytes = max(0, cellBytes)
        self.otherBytes = max(0, otherBytes)
        maxFramesBytes = 0
        let (twice, overflow) = maxStateBytes.multipliedReportingOverflow(by: 2)
        maxFramesBytes = overflow ? Int.max : twice
    }

    /// The largest payload of one frame carrying `cells` cells (saturating at `Int.max`).
    public func maxPayloadBytes(cells: Int) -> Int {
        let (cellPart, overflow) = cells.multipliedReportingOverflow(by: cellBytes)
        let (sum, overflowAgain) = cellPart.addingReportingOverflow(otherBytes)
        return overflow || overflowAgain ? Int.max : sum
    }

    /// The live state's largest payload: every cell the context holds, once.
    public var maxStateBytes: Int { maxPayloadBytes(cells: maxCells) }

    /// The largest file these frames could be stored in: their decoded bytes, zstd's worst-case expansion of them
    /// (under 1/64), and 16 MiB for the identity header, the frame headers and a torn tail.
    public var maxFileBytes: Int {
        let (sum, overflow) = maxFramesBytes.addingReportingOverflow(maxFramesBytes / 64 + (16 << 20))
        return overflow ? Int.max : sum
    }

    /// Why a snapshot of `bytes` bytes is refused unread, or nil when it is not.
    func fileSizeProblem(_ bytes: Int) -> String? {
        bytes > maxFileBytes ? "the file has \(bytes) bytes, more than the frames of one state may take (\(maxFileBytes))" : nil
    }

    /// A bound for reading a snapshot without its model (`dllava snapshot inspect`): at most `maxBytes` decoded in
    /// all, whatever the frames declare.
    public static func absolute(maxBytes: Int) -> SnapshotLimits {
        var limits = SnapshotLimits(maxCells: maxBytes, cellBytes: 0, otherBytes: maxBytes)
        limits.maxFramesBytes = max(0, maxBytes)
        return limits
    }
}

/// How a frame's payload is stored.
public enum SnapshotEncoding: UInt8, Sendable, CaseIterable, CustomStringConvertible {
    /// The payload as it is.
    case none = 0
    /// One zstd frame (level 1).
    case zstd = 1
    /// `ByteShuffle` over 4-byte elements (f32 K/V; bf16 K/V pair up two elements), then one zstd frame (level 1).
    case shuffledZstd = 2

    public var description: String {
        switch self {
        case .none: "none"
        case .zstd: "zstd"
        case .shuffledZstd: "shuffled zstd"
        }
    }

    /// The element width the shuffle uses: that of f32 K/V.
    public static let shuffleWidth = 4
    static let zstdLevel: Int32 = 1

    public func encode(_ payload: Data) throws -> Data {
        switch self {
        case .none: payload
        case .zstd: try Zstd.compress(payload, level: Self.zstdLevel)
        case .shuffledZstd: try Zstd.compress(ByteShuffle.shuffle(payload, width: Self.shuffleWidth), level: Self.zstdLevel)
        }
    }

    /// The payload back from `stored`, refusing more than `maxSize` bytes.
    public func decode(_ stored: Data, maxSize: Int) throws -> Data {
        switch self {
        case .none: stored
        case .zstd: try Zstd.decompress(stored, maxSize: maxSize)
        case .shuffledZstd: ByteShuffle.unshuffle(try Zstd.decompress(stored, maxSize: maxSize), width: Self.shuffleWidth)
        }
    }
}

/// The queue's secret that snapshots are authenticated with (HMAC-SHA256), kept in the queue's database
/// (`JobQueue.snapshotSecret`) and never in a snapshot: a snapshot whose header or frames were edited by anyone who can
/// write the file but not read the database fails its tags and is refused, as a damaged one is.
public struct SnapshotKey: Sendable {
    let secret: Data

    /// The key of a queue whose secret is `secret` (32 random bytes).
    public init(secret: Data) {
        self.secret = secret
    }

    /// HMAC-SHA256 over the concatenation of `parts`.
    func tag(_ parts: Data...) -> Data {
        var authenticator = HMAC<SHA256>(key: SymmetricKey(data: secret))
        for part in parts { authenticator.update(data: part) }
        return Data(authenticator.finalize())
    }
}

/// KV-cache snapshot files: an identity header, then frames appended one after another, like a write-ahead log.
/// The first frame (written after prefill) holds the whole state; each later one appends the K/V cells added since
/// (`SnapshotFrame`). Each frame carries its length and a sha256 over its header and its stored bytes, so a reader
/// takes the frames in order and stops at the first one that is cut short (a crash mid-append) or damaged, using
/// the state up to the frame before. The header and each frame also carry an HMAC-SHA256 tag under the queue's
/// secret (`SnapshotKey`); a frame's tag covers the header's tag, its own offset, its header and its sha256, so it
/// cannot be moved to another file or place. Tags are checked before anything is decoded. Little-endian:
///
/// ```
/// offset  size  field (file format version 4)
/// 0       8     magic "DLLAVAKV"
/// 8       4     u32 file format version (4)
/// 12      4     u32 F, then F bytes: the model's content fingerprint, UTF-8
///         4     u32 Q, then Q bytes: the queue's identity (UUID), UTF-8
///         8     i64 job id
///         4     u32 S, then S bytes: the image's sha256 (hex), UTF-8
///         4     u32 P, then P bytes: the prompt, UTF-8
///         4     u32 J, then J bytes: the generation parameters (canonical JSON), UTF-8
///         32    HMAC-SHA256 (queue secret) of every header byte before it: the header's tag
///               frames, each (`frameHeaderSize` bytes, then the stored bytes):
///         4       magic "KVFR"
///         1       u8 kind (1 = full: replaces everything before; 2 = append)
///         1       u8 encoding (`SnapshotEncoding`: 0 none, 1 zstd, 2 byte-shuffled zstd)
///         2       zero
///         8       u64 decode steps of the state after this frame
///         8       u64 K/V cells in this frame (all layers)
///         8       u64 payload bytes (decoded)
///         8       u64 N = stored bytes
///         32      sha256 of the 40 bytes above and the N stored bytes
///         32      HMAC-SHA256 (queue secret) of the header's tag, u64 this frame's offset, the 40 bytes and the sha256
///         N       the stored (encoded) payload
/// ```
///
/// Versions 1 to 3 (version 3: the same without tags) are not read: such a file is refused like any unknown version
/// and its job restarts. A
/// reader checks everything before it returns anything, never changes the file, and never allocates what a
/// header declares before the bytes are there.
public enum SnapshotFile {
    public static let magic = Data("DLLAVAKV".utf8)
    public static let frameMagic = Data("KVFR".utf8)
    public static let formatVersion: UInt32 = 4
    public static let frameHeaderSize = 104
    /// Bytes of an HMAC-SHA256 tag.
    public static let tagSize = 32
    /// Frame payloads larger than this are refused on reading.
    public static let maxPayloadSize = 4 << 30
    /// What frames are stored as: measured in the README ("Incremental snapshots").
    public static let defaultEncoding = SnapshotEncoding.none

    /// A frame as the file holds it.
    public struct FrameRecord: Sendable, Equatable {
        public var kind: SnapshotFrame.Kind
        public var encoding: SnapshotEncoding
        public var decodeSteps: Int
        public var cells: Int
        public var payloadBytes: Int
        public var storedBytes: Int
        /// Where the frame's header starts in the file.
        public var offset: Int
        /// Bytes of the frame in the file, its header included.
        public var fileBytes: Int { SnapshotFile.frameHeaderSize + storedBytes }
    }

    /// Where and why the frames stop before the end of the file.
    public struct Damage: Sendable, Equatable, CustomStringConvertible {
        public var offset: Int
        public var reason: String
        public var description: String { "from byte \(offset) on, \(reason)" }
    }

    /// A snapshot's header and its good frames, checked.
    public struct Contents: Sendable, Equatable {
        public var formatVersion: UInt32
        public var identity: SnapshotIdentity
        public var modelFingerprint: String { identity.model }
        /// Every good frame, in file order.
        public var frames: [FrameRecord]
        /// The payloads of the last full frame and of the append frames after it: what the state is made of.
        public var payloads: [Data]
        /// Bytes of the file, and of its good part (the header and the good frames): where the next frame goes.
        public var fileBytes: Int
        public var goodBytes: Int
        /// Why the bytes after `goodBytes` were not used (a torn or corrupt tail); nil when there are none.
        public var damage: Damage?
        /// Whether the header's and the frames' tags were checked against the queue's secret (a reader without it,
        /// `snapshot inspect`, checks the sha256s only).
        public var authenticated: Bool
    }

    /// The identity header every snapshot file starts with, tagged under `key`.
    public static func header(_ identity: SnapshotIdentity, key: SnapshotKey) -> Data {
        var data = magic
        append(formatVersion, to: &data)
        appendString(identity.model, to: &data)
        appendString(identity.queue, to: &data)
        append(identity.job, to: &data)
        appendString(identity.imageSHA256, to: &data)
        appendString(identity.prompt, to: &data)
        appendString(identity.parameters, to: &data)
        data.append(key.tag(data))
        return data
    }

    /// One frame's bytes, to be written at `offset` of the file whose header is `header` (after that header or
    /// the frames before it), tagged under `key`.
    public static func frame(_ frame: SnapshotFrame, encoding: SnapshotEncoding = defaultEncoding, key: SnapshotKey, header: Data,
                             offset: Int) throws -> Data {
        let stored = try encoding.encode(frame.payload)
        var data = frameMagic
        data.append(contentsOf: [frame.kind.rawValue, encoding.rawValue, 0, 0])
        append(UInt64(frame.decodeSteps), to: &data)
        append(UInt64(frame.cells), to: &data)
        append(UInt64(frame.payload.count), to: &data)
        append(UInt64(stored.count), to: &data)
        var hasher = SHA256()
        hasher.update(data: data)
        hasher.update(data: stored)
        let digest = Data(hasher.finalize())
        data.append(key.tag(header.suffix(tagSize), littleEndianBytes(UInt64(offset)), data, digest))
        data.insert(contentsOf: digest, at: data.startIndex + 40)
        data.append(stored)
        return data
    }

    /// A whole file: the header and `frames` (the first of them full).
    public static func encode(_ frames: [SnapshotFrame], identity: SnapshotIdentity, encoding: SnapshotEncoding = defaultEncoding,
                              key: SnapshotKey) throws -> Data {
        precondition(frames.first?.kind == .full, "a snapshot file starts with a full frame")
        let header = header(identity, key: key)
        var data = header
        for frame in frames { data.append(try Self.frame(frame, encoding: encoding, key: key, header: header, offset: data.count)) }
        return data
    }

    /// Reads and checks a snapshot: magic, version, identity (when `expected` is given: the model first, then
    /// queue and job, image, prompt and parameters), then the frames up to the first torn or damaged one, within
    /// `limits`. A file larger than the frames `limits` allow could hold is refused before it is read.
    public static func read(from url: URL, expected: SnapshotIdentity? = nil, limits: SnapshotLimits, key: SnapshotKey?) throws(SnapshotFileError) -> Contents {
        let data: Data
        do {
            let handle = try FileHandle(forReadingFrom: url)
            defer { try? handle.close() }
            var status = stat()
            guard fstat(handle.fileDescriptor, &status) == 0, status.st_mode & S_IFMT == S_IFREG else {
                throw SnapshotFileError.unreadable(path: url.path, reason: "not a regular file")
            }
            if let reason = limits.fileSizeProblem(Int(status.st_size)) { throw SnapshotFileError.tooLarge(path: url.path, reason: reason) }
            data = try handle.readToEnd() ?? Data()
        } catch let error as SnapshotFileError {
            throw error
        } catch {
            throw .unreadable(path: url.path, reason: (error as NSError).localizedFailureReason ?? error.localizedDescription)
        }
        return try decode(data, path: url.path, expected: expected, limits: limits, key: key)
    }

    /// Checks and unpacks a snapshot file's bytes; `path` names it in errors. A file whose first frame is not
    /// whole and intact is refused (`noCompleteFrame`): there is no state to go on from. A frame that declares more
    /// cells or bytes than `limits` allow, or frames that together do, refuse the whole snapshot (`tooLarge`): that
    /// is no torn tail but a file no job of this model wrote. With `key`, the header's tag is checked before the
    /// identity is compared (`notAuthentic`) and each frame's before it is used (a frame that fails it ends the good
    /// frames, as a damaged one does); without it (`snapshot inspect` without the queue) only the sha256s are.
    public static func decode(_ data: Data, path: String, expected: SnapshotIdentity? = nil, limits: SnapshotLimits,
                              key: SnapshotKey?) throws(SnapshotFileError) -> Contents {
        if let reason = limits.fileSizeProblem(data.count) { throw .tooLarge(path: path, reason: reason) }
        let data = Data(data)
        guard data.count >= magic.count, data.prefix(magic.count) == magic else { throw .notASnapshot(path: path) }
        var offset = magic.count
        func take(_ count: Int) throws(SnapshotFileError) -> Data {
            guard count >= 0, data.count - offset >= count else { throw .truncated(path: path) }
            defer { offset += count }
            return data.subdata(in: offset ..< offset + count)
        }
        func integer<T: FixedWidthInteger>(_: T.Type) throws(SnapshotFileError) -> T {
            let bytes = try take(MemoryLayout<T>.size)
            return bytes.withUnsafeBytes { T(littleEndian: $0.loadUnaligned(as: T.self)) }
        }
        func string(_ field: String) throws(SnapshotFileError) -> String {
            // `take` checks the declared length against the bytes present before anything is allocated.
            guard let text = String(data: try take(Int(try integer(UInt32.self))), encoding: .utf8) else {
                throw .corrupt(path: path, reason: "the \(field) is not UTF-8")
            }
            return text
        }
        let version = try integer(UInt32.self)
        guard version == formatVersion else { throw .unsupportedVersion(path: path, version: version, supported: formatVersion) }
        let model = try string("model fingerprint")
        let identity = SnapshotIdentity(model: model, queue: try string("queue identity"), job: try integer(Int64.self),
                                        imageSHA256: try string("image sha256"), prompt: try string("prompt"),
                                        parameters: try string("parameters"))
        let headerTag = try take(tagSize)
        if let key, key.tag(data.prefix(offset - tagSize)) != headerTag {
            throw .notAuthentic(path: path, reason: "its header fails its HMAC check (edited, or written for another queue)")
        }
        if let expected, model != expected.model {
            throw .differentModel(path: path, found: model, expected: expected.model)
        }
        if let expected, let reason = identity.mismatch(expected: expected) {
            throw .differentJob(path: path, reason: reason)
        }
        var (frames, damage) = scanFrames(data, from: offset, key: key, headerTag: headerTag)
        try checkLimits(frames, limits: limits, path: path)
        // Decoding can still fail on a frame whose checksum holds (a writer's bug): the frames stop there too.
        while true {
            guard let first = frames.first else {
                throw .noCompleteFrame(path: path, reason: damage?.reason ?? "it holds no frame")
            }
            guard first.kind == .full else {
                throw .noCompleteFrame(path: path, reason: "its first frame is an append frame, not a full one")
            }
            let base = frames.lastIndex { $0.kind == .full }!
            var payloads: [Data] = []
            var failed: (index: Int, reason: String)?
            for index in base ..< frames.count {
                let record = frames[index]
                let start = record.offset + frameHeaderSize
                do {
                    let payload = try record.encoding.decode(data.subdata(in: start ..< start + record.storedBytes), maxSize: record.payloadBytes)
                    guard payload.count == record.payloadBytes else {
                        throw SnapshotFileError.corrupt(path: path, reason: "\(payload.count) bytes, the header says \(record.payloadBytes)")
                    }
                    payloads.append(payload)
                } catch {
                    failed = (index, "frame \(index + 1) does not decode: \(error)")
                    break
                }
            }
            if let failed {
                damage = Damage(offset: frames[failed.index].offset, reason: failed.reason)
                frames.removeSubrange(failed.index...)
                continue
            }
            let goodBytes = frames.last.map { $0.offset + $0.fileBytes } ?? offset
            return Contents(formatVersion: version, identity: identity, frames: frames, payloads: payloads, fileBytes: data.count,
                            goodBytes: goodBytes, damage: damage, authenticated: key != nil)
        }
    }

    /// Refuses frames that declare more than `limits` allow: one frame's cells or decoded bytes, or, over the frames
    /// a state is made of (the last full frame and the append frames after it), the cells or decoded bytes together.
    static func checkLimits(_ frames: [FrameRecord], limits: SnapshotLimits, path: String) throws(SnapshotFileError) {
        for (index, frame) in frames.enumerated() {
            guard frame.cells <= limits.maxCells else {
                throw .tooLarge(path: path, reason: "frame \(index + 1) declares \(frame.cells) K/V cells, more than the model's context holds (\(limits.maxCells))")
            }
            guard frame.payloadBytes <= limits.maxPayloadBytes(cells: frame.cells) else {
                throw .tooLarge(path: path, reason: "frame \(index + 1) declares \(frame.payloadBytes) bytes for \(frame.cells) K/V cells, "
                                + "more than such a frame can hold (\(limits.maxPayloadBytes(cells: frame.cells)))")
            }
        }
        guard let base = frames.lastIndex(where: { $0.kind == .full }) else { return }
        var cells = 0, bytes = 0
        for (index, frame) in frames.enumerated().dropFirst(base) {
            cells += frame.cells
            bytes += frame.payloadBytes
            guard cells <= limits.maxCells else {
                throw .tooLarge(path: path, reason: "frames \(base + 1)-\(index + 1) declare \(cells) K/V cells, more than the model's context holds (\(limits.maxCells))")
            }
            guard bytes <= limits.maxFramesBytes else {
                throw .tooLarge(path: path, reason: "frames \(base + 1)-\(index + 1) declare \(bytes) bytes, more than the frames of one state may hold (\(limits.maxFramesBytes))")
            }
        }
    }

    /// The frames from `start` on whose header, checksum and (with `key`) tag hold, up to the first that does not
    /// (and why).
    static func scanFrames(_ data: Data, from start: Int, key: SnapshotKey?, headerTag: Data) -> (frames: [FrameRecord], damage: Damage?) {
        var frames: [FrameRecord] = []
        var offset = start
        func integer<T: FixedWidthInteger>(_: T.Type, at position: Int) -> T {
            data.withUnsafeBytes { T(littleEndian: $0.loadUnaligned(fromByteOffset: position, as: T.self)) }
        }
        while offset < data.count {
            let number = frames.count + 1
            func damaged(_ reason: String) -> (frames: [FrameRecord], damage: Damage?) {
                (frames, Damage(offset: offset, reason: "frame \(number) \(reason)"))
            }
            let remaining = data.count - offset
            guard remaining >= frameHeaderSize else { return damaged("is cut short in its header (\(remaining) of \(frameHeaderSize) bytes)") }
            guard data.subdata(in: offset ..< offset + 4) == frameMagic else { return damaged("does not start with the frame magic") }
            let stored = integer(UInt64.self, at: offset + 32)
            guard stored <= UInt64(remaining - frameHeaderSize) else {
                return damaged("is cut short: it declares \(stored) bytes, \(remaining - frameHeaderSize) follow its header")
            }
            let storedBytes = Int(stored)
            var hasher = SHA256()
            let fields = data.subdata(in: offset ..< offset + 40)
            hasher.update(data: fields)
            hasher.update(data: data.subdata(in: offset + frameHeaderSize ..< offset + frameHeaderSize + storedBytes))
            let digest = Data(hasher.finalize())
            guard digest == data.subdata(in: offset + 40 ..< offset + 72) else {
                return damaged("fails its sha256 check")
            }
            if let key, key.tag(headerTag, littleEndianBytes(UInt64(offset)), fields, digest) != data.subdata(in: offset + 72 ..< offset + frameHeaderSize) {
                return damaged("fails its HMAC check (edited, moved, or written for another queue)")
            }
            let kindByte = data[offset + 4], encodingByte = data[offset + 5]
            guard let kind = SnapshotFrame.Kind(rawValue: kindByte) else { return damaged("is of an unknown kind \(kindByte)") }
            guard let encoding = SnapshotEncoding(rawValue: encodingByte) else { return damaged("has an unknown encoding \(encodingByte)") }
            let steps = integer(UInt64.self, at: offset + 8), cells = integer(UInt64.self, at: offset + 16)
            let payloadBytes = integer(UInt64.self, at: offset + 24)
            guard payloadBytes <= UInt64(maxPayloadSize), steps <= UInt64(Int.max), cells <= UInt64(Int.max) else {
                return damaged("declares \(payloadBytes) payload bytes, \(steps) steps and \(cells) cells")
            }
            frames.append(FrameRecord(kind: kind, encoding: encoding, decodeSteps: Int(steps), cells: Int(cells), payloadBytes: Int(payloadBytes),
                                      storedBytes: storedBytes, offset: offset))
            offset += frameHeaderSize + storedBytes
        }
        return (frames, nil)
    }

    private static func littleEndianBytes(_ value: UInt64) -> Data {
        withUnsafeBytes(of: value.littleEndian) { Data($0) }
    }

    private static func appendString(_ text: String, to data: inout Data) {
        let bytes = Data(text.utf8)
        append(UInt32(bytes.count), to: &data)
        data.append(bytes)
    }

    private static func append<T: FixedWidthInteger>(_ value: T, to data: inout Data) {
        withUnsafeBytes(of: value.littleEndian) { data.append(contentsOf: $0) }
    }
}

/// Why a snapshot file was refused; each names the file.
public enum SnapshotFileError: Error, Sendable, Equatable, CustomStringConvertible {
    case unreadable(path: String, reason: String)
    case unwritable(path: String, reason: String)
    /// The file does not start with the snapshot magic.
    case notASnapshot(path: String)
    case unsupportedVersion(path: String, version: UInt32, supported: UInt32)
    /// The snapshot was taken with another model.
    case differentModel(path: String, found: String, expected: String)
    /// The snapshot belongs to another job (another id or queue), or its job's image, prompt or parameters differ.
    case differentJob(path: String, reason: String)
    /// The file ends inside its identity header.
    case truncated(path: String)
    /// The file has no whole, intact first frame: there is no state in it.
    case noCompleteFrame(path: String, reason: String)
    case corrupt(path: String, reason: String)
    /// The snapshot declares more than its job's model and context could hold (`SnapshotLimits`).
    case tooLarge(path: String, reason: String)
    /// The header fails its tag under the queue's secret: edited, or written for another queue.
    case notAuthentic(path: String, reason: String)

    public var path: String {
        switch self {
        case let .unreadable(path, _), let .unwritable(path, _), let .notASnapshot(path), let .unsupportedVersion(path, _, _),
             let .differentModel(path, _, _), let .differentJob(path, _), let .truncated(path), let .noCompleteFrame(path, _), let .corrupt(path, _),
             let .tooLarge(path, _), let .notAuthentic(path, _):
            path
        }
    }

    public var description: String {
        switch self {
        case let .unreadable(path, reason): "cannot read the snapshot \(path): \(reason)"
        case let .unwritable(path, reason): "cannot write the snapshot \(path): \(reason)"
        case let .notASnapshot(path): "\(path) is not a dllava KV snapshot (bad magic)"
        case let .unsupportedVersion(path, version, supported):
            "\(path) is snapshot format version \(version); this build reads version \(supported)"
        case let .differentModel(path, found, expected):
            "\(path) was taken with model \(found), not the loaded model \(expected)"
        case let .differentJob(path, reason): "\(path) does not belong to this job: \(reason)"
        case let .truncated(path): "\(path) is truncated"
        case let .noCompleteFrame(path, reason): "\(path) holds no complete snapshot frame: \(reason)"
        case let .corrupt(path, reason): "\(path) is a corrupt snapshot: \(reason)"
        case let .tooLarge(path, reason): "\(path) is refused: \(reason)"
        case let .notAuthentic(path, reason): "\(path) is not authentic: \(reason)"
        }
    }
}
