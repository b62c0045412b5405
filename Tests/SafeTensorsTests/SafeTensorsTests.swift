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
}
