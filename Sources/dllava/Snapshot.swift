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
            abstract: "Print a snapshot's header after checking the whole file.",
            discussion: """
            Checks the magic, format version, length, zstd frame and sha256 of the payload, then \
            decodes the generation state. Prints the format versions, the queue and job the \
            snapshot belongs to, its image sha256, prompt and parameters, the model fingerprint, K/V \
            storage type, layers and cells per layer, prompt and generated tokens, decode step, \
            sampler, sizes and the checksum. A bad file exits 65 with a sentence naming it.
            """)

        @Argument(help: "A .kv.zst snapshot file.")
        var file: String

        @Flag(help: "Print one JSON object.")
        var json = false

        func run() throws {
            try reportingFailures {
                let contents: SnapshotFile.Contents
                do {
                    contents = try SnapshotFile.read(from: URL(fileURLWithPath: file))
                } catch {
                    throw CommandFailure(message: "\(error)", code: 65)
                }
                let state: GenerationSnapshot
                do {
                    state = try GenerationSnapshot(decoding: contents.payload)
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
    var dtype = "f32"
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
    var payloadBytes: Int
    var keyValueBytes: Int
    var payloadSHA256: String
    var checksumOK = true

    init(_ contents: SnapshotFile.Contents, _ state: GenerationSnapshot) {
        fileFormatVersion = contents.formatVersion
        stateFormatVersion = GenerationSnapshot.formatVersion
        modelFingerprint = contents.modelFingerprint
        queue = contents.identity.queue
        job = contents.identity.job
        imageSHA256 = contents.identity.imageSHA256
        prompt = contents.identity.prompt
        parameters = contents.identity.parameters
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
        payloadBytes = contents.payloadBytes
        keyValueBytes = cellsPerLayer.reduce(0, +) * keyValueWidth * 2 * 4
        payloadSHA256 = contents.payloadSHA256
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
        return """
        \(file)
          format:          file version \(fileFormatVersion), state version \(stateFormatVersion)
          job:             \(job) of queue \(queue)
          image sha256:    \(imageSHA256)
          prompt:          \(prompt.debugDescription)
          parameters:      \(parameters)
          model:           \(modelFingerprint)
          K/V storage:     \(dtype), \(layers) layers of width \(keyValueWidth)
          cells per layer: \(cellsPerLayer.map(String.init).joined(separator: " "))
          tokens:          \(promptTokens) in the prompt (\(imageTokens) image), \(generatedTokens) generated
          decode step:     \(decodeSteps)\(finished ? " (finished)" : "")
          sampler:         \(sampling); state \(samplerState.joined(separator: " "))
          sizes:           \(fileBytes) bytes on disk, \(payloadBytes) uncompressed, \(keyValueBytes) of K/V
          checksum:        sha256 \(payloadSHA256) ok
        """
    }

    enum CodingKeys: String, CodingKey {
        case fileFormatVersion = "file_format_version", stateFormatVersion = "state_format_version"
        case modelFingerprint = "model_fingerprint", queue, job, imageSHA256 = "image_sha256", prompt, parameters, dtype, layers, keyValueWidth = "key_value_width"
        case cellsPerLayer = "cells_per_layer", promptTokens = "prompt_tokens", imageTokens = "image_tokens"
        case generatedTokens = "generated_tokens", decodeSteps = "decode_steps", finished, sampler
        case samplerState = "sampler_state", fileBytes = "file_bytes", payloadBytes = "payload_bytes"
        case keyValueBytes = "key_value_bytes", payloadSHA256 = "payload_sha256", checksumOK = "checksum_ok"
    }
}
