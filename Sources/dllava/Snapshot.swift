import ArgumentParser
import Artifacts
import DynamicLLaVA
import Foundation

struct Snapshot: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Work with KV-cache snapshot files (`dllava run` writes them to OUT/snapshots).",
        subcommands: [Inspect.self])

    struct Inspect: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "List a snapshot's frames and print the state they make, after checking the whole file.",
            discussion: """
            Checks the magic, format version and identity header, then every frame's length and sha256, \
            decodes the frames from the last full one on and the generation state they make. Prints the \
            format versions, the queue and job the snapshot belongs to, its image sha256, prompt and \
            parameters, the model fingerprint; each frame's kind (full or append), the decode steps it \
            covers, its cells, bytes and encoding; where a torn or damaged tail starts (a reader ignores \
            it and resumes from the frames before); then the K/V storage type, layers and cells per \
            layer, prompt and generated tokens, decode step, sampler and sizes. A file with no intact \
            first frame, or otherwise bad, exits 65 with a sentence naming it.

            With --model, frames are bounded by what that model's jobs can hold (layers x K/V width x \
            context, as `run` bounds them); without it, by what the frames declare and at most \
            \(Inspect.maxBytesWithoutModel >> 20) MiB decoded in all. A snapshot declaring more is refused \
            (exit 65) before anything is decompressed.

            With --db, the header's and the frames' HMAC tags are checked with the queue's snapshot secret, as \
            `run` checks them (a snapshot edited outside dllava, or written for another queue, is refused); \
            without it only the sha256s are, and the output says authenticity was not checked.
            """)

        /// The most a snapshot inspected without its model may decode to.
        static let maxBytesWithoutModel = 256 << 20

        @Argument(help: "A .kv.zst snapshot file.")
        var file: String

        @Option(help: "The model directory whose jobs wrote the snapshot: bounds its frames by the model's shape and context.")
        var model: String?

        @Option(name: .customLong("db"), help: ArgumentHelp("The queue whose workers wrote the snapshot (SQLite file or postgres:// URL): checks its HMAC tags.",
                                                            valueName: "path-or-url"))
        var database: String?

        @Flag(help: "Print one JSON object.")
        var json = false

        func run() throws {
            try reportingFailures {
                var limits = SnapshotLimits.absolute(maxBytes: Self.maxBytesWithoutModel)
                if let model {
                    let c = try LLaVAModel.languageConfiguration(directory: URL(fileURLWithPath: model))
                    let bounds = GenerationSnapshot.bounds(layers: c.hiddenLayers, keyValueWidth: c.keyValueWidth, contextLength: c.maxPositionEmbeddings,
                                                           storage: .float32)
                    limits = SnapshotLimits(maxCells: bounds.maxCells, cellBytes: bounds.cellBytes, otherBytes: bounds.otherBytes)
                }
                var key: SnapshotKey?
                if let database {
                    do {
                        key = SnapshotKey(secret: try DatabaseOptions.open(database, access: .readOnly, busyTimeout: 10).snapshotSecret)
                    } catch {
                        throw queueCommandFailure(error, database: DatabaseOptions.displayed(database))
                    }
                }
                let contents: SnapshotFile.Contents
                do {
                    contents = try SnapshotFile.read(from: URL(fileURLWithPath: file), limits: limits, key: key)
                } catch {
                    throw CommandFailure(message: "\(error)", code: 65)
                }
                let state: GenerationSnapshot
                do {
                    state = try GenerationSnapshot(frames: contents.payloads)
                } catch {
                    throw CommandFailure(message: "\(file): \(error)", code: 65)
                }
                let header = SnapshotHeader(contents, state)
                if json {
                    let encoder = JSONEncoder()
                    encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
                    print(String(decoding: try encoder.encode(header), as: UTF8.self))
                } else {
                    print(header.text(file: file))
                }
            }
        }
    }
}

/// What `snapshot inspect` reports.
struct SnapshotHeader: Encodable {
    var fileFormatVersion: UInt32
    var stateFormatVersion: UInt32
    var modelFingerprint: String
    var queue: String
    var job: Int64
    var imageSHA256: String
    var prompt: String
    /// Canonical JSON, as the job row stores it.
    var parameters: String
    var frames: [Frame]
    /// Where the frames stop before the end of the file, and why; nil when every byte is in a good frame.
    var damage: Damage?
    var dtype: String
    var layers: Int
    var keyValueWidth: Int
    var cellsPerLayer: [Int]
    var promptTokens: Int
    var imageTokens: Int
    var generatedTokens: Int
    var decodeSteps: Int
    var finished: Bool
    var sampler: Sampler
    /// xoshiro256** state words, hex.
    var samplerState: [String]
    var fileBytes: Int
    var keyValueBytes: Int
    /// Every frame intact, to the end of the file.
    var checksumOK: Bool
    /// Whether the HMAC tags were checked with the queue's secret (`--db`).
    var authenticated: Bool

    /// One frame as the file holds it.
    struct Frame: Encodable {
        var kind: String
        /// The decode steps the frame brings the state through: after the previous frame's, up to its own.
        var firstStep: Int
        var lastStep: Int
        var cells: Int
        var offset: Int
        var storedBytes: Int
        var payloadBytes: Int
        var encoding: String

        enum CodingKeys: String, CodingKey {
            case kind, firstStep = "first_step", lastStep = "last_step", cells, offset, storedBytes = "stored_bytes"
            case payloadBytes = "payload_bytes", encoding
        }
    }

    struct Damage: Encodable {
        var offset: Int
        var reason: String
    }

    init(_ contents: SnapshotFile.Contents, _ state: GenerationSnapshot) {
        fileFormatVersion = contents.formatVersion
        stateFormatVersion = GenerationSnapshot.formatVersion
        modelFingerprint = contents.modelFingerprint
        queue = contents.identity.queue
        job = contents.identity.job
        imageSHA256 = contents.identity.imageSHA256
        prompt = contents.identity.prompt
        parameters = contents.identity.parameters
        var previousSteps: Int?
        frames = contents.frames.map { record in
            defer { previousSteps = record.decodeSteps }
            let first = record.kind == .full ? 0 : (previousSteps.map { $0 + 1 } ?? 0)
            return Frame(kind: record.kind.description, firstStep: min(first, record.decodeSteps), lastStep: record.decodeSteps, cells: record.cells,
                         offset: record.offset, storedBytes: record.storedBytes, payloadBytes: record.payloadBytes,
                         encoding: record.encoding.description)
        }
        damage = contents.damage.map { Damage(offset: $0.offset, reason: $0.reason) }
        layers = state.cells.count
        keyValueWidth = state.keyValueWidth
        cellsPerLayer = state.cells.map(\.cellCount)
        promptTokens = state.promptLength
        imageTokens = state.imageTokens
        generatedTokens = state.result.tokenIDs.count
        decodeSteps = state.decodeSteps
        finished = state.finished
        let sampling = state.parameters.sampling
        sampler = Sampler(temperature: sampling.temperature, topK: sampling.topK, topP: sampling.topP, seed: sampling.seed)
        samplerState = state.sampler.generator.state.map { String($0, radix: 16) }
        fileBytes = contents.fileBytes
        let storage = state.cells.first?.storage ?? .float32
        dtype = storage == .bfloat16 ? "bf16" : "f32"
        keyValueBytes = cellsPerLayer.reduce(0, +) * keyValueWidth * 2 * storage.byteCount
        checksumOK = contents.damage == nil
        authenticated = contents.authenticated
    }

    /// The sampling parameters, spelled as manifests spell them.
    struct Sampler: Encodable {
        var temperature: Float
        var topK: Int
        var topP: Float
        var seed: UInt64

        var isGreedy: Bool { temperature <= 0 }

        enum CodingKeys: String, CodingKey {
            case temperature, topK = "top_k", topP = "top_p", seed
        }
    }

    func text(file: String) -> String {
        let sampling = sampler.isGreedy ? "greedy"
            : "temperature \(sampler.temperature), top-k \(sampler.topK), top-p \(sampler.topP), seed \(sampler.seed)"
        let frameLines = frames.enumerated().map { index, frame in
            let steps = frame.firstStep == frame.lastStep ? "step \(frame.lastStep)" : "steps \(frame.firstStep)-\(frame.lastStep)"
            return "  frame \(index + 1):" + String(repeating: " ", count: max(1, 10 - String(index + 1).count))
                + "\(frame.kind), \(steps), \(frame.cells) cells, \(frame.storedBytes) bytes stored (\(frame.encoding)) of \(frame.payloadBytes), at byte \(frame.offset)"
        }
        let tail = damage.map { "torn tail from byte \($0.offset) (ignored; a resume uses the frames above): \($0.reason)" } ?? "none: every frame is intact"
        return """
        \(file)
          format:          file version \(fileFormatVersion), state version \(stateFormatVersion)
          job:             \(job) of queue \(queue)
          image sha256:    \(imageSHA256)
          prompt:          \(prompt.debugDescription)
          parameters:      \(parameters)
          model:           \(modelFingerprint)
        \(frameLines.joined(separator: "\n"))
          damage:          \(tail)
          K/V storage:     \(dtype), \(layers) layers of width \(keyValueWidth)
          cells per layer: \(cellsPerLayer.map(String.init).joined(separator: " "))
          tokens:          \(promptTokens) in the prompt (\(imageTokens) image), \(generatedTokens) generated
          decode step:     \(decodeSteps)\(finished ? " (finished)" : "")
          sampler:         \(sampling); state \(samplerState.joined(separator: " "))
          sizes:           \(fileBytes) bytes on disk, \(keyValueBytes) of live K/V
          checksums:       \(checksumOK ? "ok" : "a frame is torn or damaged (see damage)")
          authenticity:    \(authenticated ? "ok: the HMAC tags hold under the queue's secret" : "not checked (pass --db with the queue that wrote it)")
        """
    }

    enum CodingKeys: String, CodingKey {
        case fileFormatVersion = "file_format_version", stateFormatVersion = "state_format_version"
        case modelFingerprint = "model_fingerprint", queue, job, imageSHA256 = "image_sha256", prompt, parameters, frames, damage
        case dtype, layers, keyValueWidth = "key_value_width"
        case cellsPerLayer = "cells_per_layer", promptTokens = "prompt_tokens", imageTokens = "image_tokens"
        case generatedTokens = "generated_tokens", decodeSteps = "decode_steps", finished, sampler
        case samplerState = "sampler_state", fileBytes = "file_bytes"
        case keyValueBytes = "key_value_bytes", checksumOK = "checksum_ok", authenticated
    }
}
