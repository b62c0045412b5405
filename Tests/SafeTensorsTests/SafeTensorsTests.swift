// The safetensors reader accepts valid files and rejects malformed ones with an error that
// names the file and the tensor.
import Foundation
import Testing
@testable import SafeTensors
import Numerics

/// Writes a safetensors file from a header JSON string and raw data bytes.
func writeSafeTensors(_ name: String, header: String, data: [UInt8], in directory: URL, declaredLength: UInt64? = nil) throws -> String {
    var bytes = [UInt8]()
    let headerBytes = Array(header.utf8)
    withUnsafeBytes(of: (declaredLength ?? UInt64(headerBytes.count)).littleEndian) { bytes += $0 }
    bytes += headerBytes + data
    let url = directory.appendingPathComponent(name)
    try Data(bytes).write(to: url)
    return url.path
}

func temporaryDirectory() throws -> URL {
    let url = FileManager.default.temporaryDirectory.appendingPathComponent("dllava-tests-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
    return url
}

func floatBytes(_ values: [Float]) -> [UInt8] {
    values.flatMap { v in withUnsafeBytes(of: v.bitPattern.littleEndian) { Array($0) } }
}

@Suite struct SafeTensorsTests {
    @Test("reads f32, f16 and bf16 tensors and widens them")
    func readsAllFloatTypes() throws {
        let directory = try temporaryDirectory()
        let halves: [UInt16] = [0x3C00, 0xC000]       // 1, -2 in f16
        let brains: [UInt16] = [0x3F80, 0x4040]       // 1, 3 in bf16
        let data = floatBytes([0.5, -1.5]) + halves.flatMap { withUnsafeBytes(of: $0.littleEndian) { Array($0) } }
            + brains.flatMap { withUnsafeBytes(of: $0.littleEndian) { Array($0) } }
        let header = #"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F16","shape":[1,2],"data_offsets":[8,12]},"c":{"dtype":"BF16","shape":[2,1],"data_offsets":[12,16]},"__metadata__":{"format":"pt"}}"#
        let file = try SafeTensorsFile(path: writeSafeTensors("ok.safetensors", header: header, data: data, in: directory))
        #expect(try file.tensors["a"]!.floats() == [0.5, -1.5])
        #expect(try file.tensors["b"]!.floats() == [1, -2])
        #expect(try file.tensors["c"]!.floats() == [1, 3])
        #expect(try file.tensors["c"]!.weight().rows == 2)
        #expect(file.metadata["format"] == "pt")
    }

    @Test("rejects malformed files with the file and tensor named", arguments: [
        ("offsets past the end", #"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#, 8, "w"),
        ("byte length differs from shape", #"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, 8, "w"),
        ("overlapping tensors", #"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"x":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#, 8, "overlap"),
        ("header not JSON", "{not json", 8, "JSON"),
        ("missing data_offsets", #"{"w":{"dtype":"F32","shape":[2]}}"#, 8, "w"),
    ])
    func rejectsMalformed(_ label: String, header: String, dataBytes: Int, mentions: String) throws {
        let directory = try temporaryDirectory()
        let path = try writeSafeTensors("bad.safetensors", header: header, data: Array(repeating: 0, count: dataBytes), in: directory)
        do {
            _ = try SafeTensorsFile(path: path)
            Issue.record("\(label): accepted a malformed file")
        } catch {
            #expect(error.description.contains(path), "\(label): \(error)")
            #expect(error.description.contains(mentions), "\(label): \(error)")
            #expect(error.exitCode == 65)
        }
    }

    @Test("rejects an unsupported dtype by name, a truncated header, and an empty file")
    func rejectsOtherBadInput() throws {
        let directory = try temporaryDirectory()
        let f8 = try writeSafeTensors("f8.safetensors", header: #"{"q":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]}}"#, data: [1, 2], in: directory)
        #expect(throws: CheckpointError.unsupportedDType(file: f8, tensor: "q", dtype: "F8_E4M3")) { try SafeTensorsFile(path: f8) }
        // I8 (q8 quants) is read, but is not a float weight of its own.
        let int8 = try writeSafeTensors("i8.safetensors", header: #"{"q":{"dtype":"I8","shape":[2],"data_offsets":[0,2]}}"#, data: [1, 2], in: directory)
        #expect(throws: CheckpointError.unsupportedDType(file: int8, tensor: "q", dtype: "I8")) { try SafeTensorsFile(path: int8).tensors["q"]!.weight() }
        let truncated = try writeSafeTensors("t.safetensors", header: "{}", data: [], in: directory, declaredLength: 1000)
        #expect(throws: CheckpointError.self) { try SafeTensorsFile(path: truncated) }
        let empty = directory.appendingPathComponent("empty.safetensors")
        try Data().write(to: empty)
        #expect(throws: CheckpointError.malformed(file: empty.path, reason: "the file is empty")) { try SafeTensorsFile(path: empty.path) }
        #expect(throws: CheckpointError.self) { try SafeTensorsFile(path: directory.appendingPathComponent("absent.safetensors").path) }
    }

    @Test("a sharded checkpoint resolves every tensor through its index, and checks shapes")
    func shardedCheckpoint() throws {
        let directory = try temporaryDirectory()
        _ = try writeSafeTensors("model-00001-of-00002.safetensors", header: #"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#, data: floatBytes([7]), in: directory)
        _ = try writeSafeTensors("model-00002-of-00002.safetensors", header: #"{"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, data: floatBytes([1, 2]), in: directory)
        try Data(#"{"metadata":{},"weight_map":{"a":"model-00001-of-00002.safetensors","b":"model-00002-of-00002.safetensors"}}"#.utf8)
            .write(to: directory.appendingPathComponent("model.safetensors.index.json"))
        let checkpoint = try Checkpoint(directory: directory)
        #expect(try checkpoint.floats("a", shape: [1]) == [7])
        #expect(try checkpoint.floats("b", shape: [2]) == [1, 2])
        #expect(throws: CheckpointError.self) { try checkpoint.floats("b", shape: [3]) }
        #expect(throws: CheckpointError.self) { try checkpoint.tensor("c") }

        // An index naming a tensor its shard lacks.
        try Data(#"{"weight_map":{"a":"model-00001-of-00002.safetensors","z":"model-00001-of-00002.safetensors"}}"#.utf8)
            .write(to: directory.appendingPathComponent("model.safetensors.index.json"))
        #expect(throws: CheckpointError.missingTensor(file: directory.appendingPathComponent("model-00001-of-00002.safetensors").path, tensor: "z")) {
            try Checkpoint(directory: directory)
        }
    }

    @Test("a header length past the format's 100 MB cap, 2^63+5 among them, is refused as malformed, naming the file",
          arguments: [UInt64(1) << 63 + 5, UInt64.max, UInt64(SafeTensorsFile.maxHeaderBytes) + 1])
    func hugeHeaderLength(_ declared: UInt64) throws {
        let directory = try temporaryDirectory()
        let path = try writeSafeTensors("huge.safetensors", header: "{}", data: [], in: directory, declaredLength: declared)
        do {
            _ = try SafeTensorsFile(path: path)
            Issue.record("accepted a header length of \(declared)")
        } catch {
            #expect(error.exitCode == 65)
            #expect(error.description.contains(path) && error.description.contains("header length"), "\(error)")
        }
    }

    @Test("files of random bytes, and random bytes after a valid length, are refused with an error, never a trap")
    func randomBytes() throws {
        let directory = try temporaryDirectory()
        var generator = SplitMix64(seed: 22)
        for round in 0..<200 {
            var bytes = (0..<Int.random(in: 1...300, using: &generator)).map { _ in UInt8.random(in: 0...255, using: &generator) }
            if round % 2 == 1, bytes.count > 8 {
                // A plausible length, so the JSON parser sees the random bytes.
                withUnsafeBytes(of: UInt64(bytes.count - 8).littleEndian) { bytes.replaceSubrange(0..<8, with: $0) }
            }
            let url = directory.appendingPathComponent("random-\(round).safetensors")
            try Data(bytes).write(to: url)
            #expect(throws: CheckpointError.self) { try SafeTensorsFile(path: url.path) }
        }
    }

    @Test("shapes whose products overflow or exceed any real tensor, and numbers that are no Int, are refused as malformed", arguments: [
        ("shape product overflows", #"{"w":{"dtype":"F32","shape":[4294967296,4294967296,1],"data_offsets":[0,0]}}"#, "w"),
        ("zero-size tensor with huge dimensions", #"{"w":{"dtype":"F32","shape":[0,4611686018427387904,4611686018427387904],"data_offsets":[0,0]}}"#, "w"),
        ("dimension past Int", #"{"w":{"dtype":"F32","shape":[18446744073709551615],"data_offsets":[0,4]}}"#, "w"),
        ("offset past Int", #"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,18446744073709551615]}}"#, "w"),
        ("fractional offset", #"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4.5]}}"#, "w"),
        ("begin after end", #"{"w":{"dtype":"F32","shape":[0],"data_offsets":[4,0]}}"#, "w"),
        ("negative offset", #"{"w":{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}}"#, "w"),
    ])
    func hostileNumbers(_ label: String, header: String, mentions: String) throws {
        let directory = try temporaryDirectory()
        let path = try writeSafeTensors("bad.safetensors", header: header, data: Array(repeating: 0, count: 8), in: directory)
        do {
            let file = try SafeTensorsFile(path: path)
            Issue.record("\(label): accepted \(file.tensors.mapValues(\.shape))")
        } catch {
            #expect(error.exitCode == 65, "\(label): \(error)")
            #expect(error.description.contains(path) && error.description.contains(mentions), "\(label): \(error)")
        }
    }

    @Test("a FIFO named like a checkpoint is refused at once, not waited on")
    func fifoIsRefused() throws {
        let directory = try temporaryDirectory()
        let path = directory.appendingPathComponent("model.safetensors").path
        #expect(mkfifo(path, 0o600) == 0)
        #expect(throws: CheckpointError.unreadable(file: path, reason: "not a regular file")) { try SafeTensorsFile(path: path) }
    }

    @Test("an index whose shard is not a plain file name in the model directory is refused, naming the index",
          arguments: ["../model.safetensors", "/etc/passwd", "..", ""])
    func indexShardOutsideTheDirectory(_ shard: String) throws {
        let directory = try temporaryDirectory()
        let index = directory.appendingPathComponent("model.safetensors.index.json")
        try JSONSerialization.data(withJSONObject: ["weight_map": ["a": shard]]).write(to: index)
        do {
            _ = try Checkpoint(directory: directory)
            Issue.record("accepted the shard '\(shard)'")
        } catch {
            #expect(error == .invalidConfiguration(file: index.path, reason: "shard name '\(shard)' is not a plain file name"))
        }
    }
}
