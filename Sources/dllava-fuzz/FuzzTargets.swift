import Artifacts
import BatchDaemon
import Crypto
import Foundation
import Imaging
import JobQueue
import SafeTensors
import Tokenizer

/// One parser of untrusted bytes, driven with arbitrary input. A target returns normally for every input: a thrown
/// error is the expected answer to bad bytes; a crash, a trap, a sanitizer report, an allocation over libFuzzer's limit or
/// a hang is a finding.
struct FuzzTarget: Sendable {
    /// The name `Scripts/fuzz` and the corpus folder (`Tests/Fuzz/corpus/<name>`) use.
    let name: String
    let run: @Sendable (Data) -> Void
}

/// Files the file-based readers read, one scratch folder per process, rewritten on every input and removed at exit.
enum Scratch {
    static let folder: URL = {
        let folder = FileManager.default.temporaryDirectory.appendingPathComponent("dllava-fuzz-\(getpid())", isDirectory: true)
        try? FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        atexit { try? FileManager.default.removeItem(at: Scratch.folder) }
        return folder
    }()

    /// Writes `data` to `name` in the scratch folder and returns its URL; nil `data` makes `name` a folder.
    static func file(_ name: String, _ data: Data?) -> URL {
        let url = folder.appendingPathComponent(name)
        do {
            if let data { try data.write(to: url) } else { try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true) }
        } catch {
            fatalError("dllava-fuzz: cannot write \(url.path): \(error)")
        }
        return url
    }
}

/// The queue manifests are enqueued into: one SQLite file per process (manifest images never exist, so lines that
/// parse end as "image not found" problems; a line naming an existing file would enqueue a job, which is fine).
let manifestQueue: SQLiteJobQueue = {
    do {
        return try SQLiteJobQueue(path: Scratch.folder.appendingPathComponent("queue.sqlite").path, create: true, durability: .normal)
    } catch {
        fatalError("dllava-fuzz: cannot create the manifest queue: \(error)")
    }
}()

/// The bounds a snapshot is read under: a small model's (4 layers x 256 tokens of context, K/V width 64 in f32), so
/// that frames which declare more are refused before anything is decompressed, as `run` refuses them.
let snapshotLimits = SnapshotLimits(maxCells: 4 * 256, cellBytes: 4 + 2 * 64 * 4, otherBytes: 64 * 1024 + 2048 * 256)

enum FuzzTargets {
    static let all: [FuzzTarget] = [
        // The 8-byte length, the JSON header, tensor extents and the q8 `__metadata__`.
        FuzzTarget(name: "safetensors") { data in
            let folder = Scratch.file("checkpoint", nil)
            _ = Scratch.file("checkpoint/model.safetensors", data)
            guard let checkpoint = try? Checkpoint(directory: folder) else { return }
            for (name, tensor) in checkpoint.tensors {
                if tensor.dtype == .i8, tensor.shape.count == 2 { _ = try? checkpoint.weight(name, shape: tensor.shape) }
                _ = try? tensor.floats()
                _ = try? tensor.integers()
            }
        },
        // A snapshot file: envelope, identity header and format-4 frames (torn-tail recovery, size bounds, zstd
        // payloads), read as `snapshot inspect` reads it without the queue (tags unchecked) under the bounds of a
        // small model. The frames' sha256 stops almost every mutation at the first frame, so each input is also
        // decoded with the checksums made to hold, which takes the fuzzer on to the frame fields and the payloads.
        FuzzTarget(name: "snapshot") { data in
            _ = try? SnapshotFile.decode(data, path: "fuzz.kv", limits: snapshotLimits, key: nil)
            if let fixed = SnapshotChecksums.fixed(data) {
                _ = try? SnapshotFile.decode(fixed, path: "fuzz.kv", limits: snapshotLimits, key: nil)
            }
        },
        // A result file as stored (zstd), and the same bytes as the JSON inside one.
        FuzzTarget(name: "result") { data in
            _ = try? ResultFile.decode(ResultSummary.self, from: data, path: "fuzz.json.zst")
            if let compressed = try? Zstd.compress(data, level: 1) {
                _ = try? ResultFile.decode(ResultSummary.self, from: compressed, path: "fuzz.json.zst")
            }
        },
        FuzzTarget(name: "manifest-jsonl") { data in
            let url = Scratch.file("manifest.jsonl", data)
            _ = try? manifestQueue.enqueueJSONL(url)
        },
        FuzzTarget(name: "manifest-csv") { data in
            let url = Scratch.file("manifest.csv", data)
            _ = try? manifestQueue.enqueueCSV(url)
        },
        // `tokenizer.json`, then a round trip of a few texts through what loaded.
        FuzzTarget(name: "tokenizer-json") { data in
            let url = Scratch.file("tokenizer.json", data)
            guard let tokenizer = try? SentencePieceTokenizer(contentsOf: url) else { return }
            exercise(tokenizer)
        },
        // `tokenizer.model` (sentencepiece's protobuf), then a round trip of a few texts.
        FuzzTarget(name: "tokenizer-model") { data in
            let url = Scratch.file("tokenizer.model", data)
            guard let tokenizer = try? SentencePieceTokenizer(contentsOf: url) else { return }
            exercise(tokenizer)
        },
        // JPEG and PNG through the decoder's size limits and EXIF orientation, then CLIP preprocessing of
        // what decoded (odd sizes such as 1 x N reach the resampler). The last byte picks the orientation option.
        FuzzTarget(name: "image") { data in
            let options = ImageDecoder.Options(applyExifOrientation: data.last.map { $0 & 1 == 1 } ?? false,
                                               maxPixels: 4_000_000, maxFileBytes: 1 << 20)
            guard let image = try? ImageDecoder(options: options).decode(data: data, name: "fuzz.img") else { return }
            _ = CLIPImagePreprocessor(resolution: 32).pixelValues(for: image)
        },
        // `--db postgres://...`.
        FuzzTarget(name: "postgres-url") { data in
            let text = String(decoding: data, as: UTF8.self)
            if let address = try? PostgresAddress(text, environment: [:]) { _ = address.description }
        },
        // `--max-time`, `--older-than`, `--lease`, `--window` and `--snapshot-every`.
        FuzzTarget(name: "duration") { data in
            let text = String(decoding: data, as: UTF8.self)
            if let milliseconds = DurationText.milliseconds(text) { _ = DurationText.describe(milliseconds: milliseconds) }
            if let interval = SnapshotInterval(text) { _ = interval.description }
        },
    ]

    static let texts = ["  A cat,\nworld! </s> <s> 日本 🦙", "\u{0}\u{FFFD}x"]

    static func exercise(_ tokenizer: SentencePieceTokenizer) {
        for text in texts {
            let ids = tokenizer.encode(text)
            _ = tokenizer.decode(ids)
            _ = tokenizer.encodeAsSlowLlamaTokenizer(text)
        }
        let vocabulary = Int32(clamping: tokenizer.vocabularySize)
        _ = tokenizer.decode([0, 1, 2, vocabulary - 1, vocabulary, -1, Int32.max, Int32.min])
        for id: Int32 in [0, vocabulary - 1, vocabulary, -1] { _ = tokenizer.piece(id) }
    }
}

/// Rewrites the sha256 of every frame of a snapshot file (`SnapshotFile`'s layout, read loosely) to match.
enum SnapshotChecksums {
    /// `data` with each frame's checksum recomputed, from the first frame up to the first whose header or declared
    /// stored size does not fit; nil when the identity header itself does not parse.
    static func fixed(_ data: Data) -> Data? {
        var bytes = [UInt8](data)
        func integer(at offset: Int, size: Int) -> UInt64? {
            guard offset >= 0, size <= 8, bytes.count - offset >= size else { return nil }
            return bytes[offset ..< offset + size].reversed().reduce(0) { $0 << 8 | UInt64($1) }
        }
        var offset = SnapshotFile.magic.count + 4
        // Five length-prefixed strings with the i64 job id after the second, then the header's tag.
        for field in 0 ..< 5 {
            guard let length = integer(at: offset, size: 4), length <= UInt64(bytes.count) else { return nil }
            offset += 4 + Int(length)
            if field == 1 { offset += 8 }
        }
        offset += SnapshotFile.tagSize
        // A frame's header: 40 bytes of fields, their sha256 (with the stored bytes), the frame's tag.
        let header = SnapshotFile.frameHeaderSize
        while bytes.count - offset >= header, let stored = integer(at: offset + 32, size: 8), stored <= UInt64(bytes.count - offset - header) {
            let end = offset + header + Int(stored)
            var hasher = SHA256()
            hasher.update(data: bytes[offset ..< offset + 40])
            hasher.update(data: bytes[offset + header ..< end])
            bytes.replaceSubrange(offset + 40 ..< offset + 72, with: Array(hasher.finalize()))
            offset = end
        }
        return Data(bytes)
    }
}
