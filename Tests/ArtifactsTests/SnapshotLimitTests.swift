// Crafted snapshots that declare more than their job could hold (zstd bombs, append bombs, lying sizes, more cells
// than the context) are refused before they are decompressed, and refusing them costs the reader no memory.
import CommandLineSupport
import Foundation
import Testing
@testable import Artifacts

@Suite("Snapshot files: crafted sizes", .serialized)
struct SnapshotLimitTests {
    /// The shipped model's bounds (4 layers of K/V width 192, a context of 2048, f32 K/V), as `run` computes them.
    static let limits = SnapshotLimits(maxCells: 4 * 2048, cellBytes: 4 + 2 * 192 * 4, otherBytes: 72 + 4 * 2048 + 8 * 4 + (64 << 10) + (2 << 10) * 2048)

    static let secret = Data(repeating: 7, count: 32)

    /// A file of `frames` after a header, tagged with the queue's secret: what could only be written by someone who
    /// holds it, so the bounds, not the tags, must refuse it.
    static func file(_ frames: [CraftedSnapshot.Frame]) -> Data {
        let header = SnapshotFile.header(SnapshotIdentity(model: "m", queue: "0b5c6e0a-9d57-4f3e-8a36-2f1f3f5e1c11", job: 1,
                                                          imageSHA256: String(repeating: "ab", count: 32), prompt: "Describe the image.",
                                                          parameters: "{}"), key: SnapshotKey(secret: secret))
        return CraftedSnapshot.file(header: header, frames: frames, secret: secret)
    }

    /// A valid-looking small full frame (its payload is not a generation state: the file layer does not look inside).
    static let smallFullFrame = CraftedSnapshot.Frame(kind: 1, encoding: 0, steps: 0, cells: 10, payloadBytes: 4096, stored: Data(count: 4096))

    static let gibibyte = 1 << 30

    static let cases: [(name: String, bytes: @Sendable () -> Data, refusal: String)] = [
        ("a first frame of 1 GiB of zstd zeros", {
            file([CraftedSnapshot.Frame(kind: 1, encoding: 1, steps: 0, cells: 0, payloadBytes: UInt64(gibibyte), stored: CraftedSnapshot.zstdZeros(count: gibibyte))])
        }, "frame 1 declares 1073741824 bytes for 0 K/V cells"),
        ("a first frame declaring more cells than the context holds", {
            let cells = limits.maxCells + 1, bytes = limits.maxPayloadBytes(cells: cells)
            return file([CraftedSnapshot.Frame(kind: 1, encoding: 1, steps: 0, cells: UInt64(cells), payloadBytes: UInt64(bytes),
                                                  stored: CraftedSnapshot.zstdZeros(count: bytes))])
        }, "frame 1 declares 8193 K/V cells, more than the model's context holds (8192)"),
        ("three 256 MiB append bombs after a valid first frame", {
            let bomb = CraftedSnapshot.Frame(kind: 2, encoding: 1, steps: 1, cells: 0, payloadBytes: UInt64(gibibyte / 4),
                                             stored: CraftedSnapshot.zstdZeros(count: gibibyte / 4))
            return file([smallFullFrame, bomb, bomb, bomb])
        }, "frame 2 declares 268435456 bytes for 0 K/V cells"),
        ("append frames whose cells together pass the context", {
            let cells = limits.maxCells / 2, bytes = limits.maxPayloadBytes(cells: cells)
            let append = CraftedSnapshot.Frame(kind: 2, encoding: 1, steps: 1, cells: UInt64(cells), payloadBytes: UInt64(bytes),
                                               stored: CraftedSnapshot.zstdZeros(count: bytes))
            return file([smallFullFrame, append, append])
        }, "frames 1-3 declare 8202 K/V cells, more than the model's context holds (8192)"),
        ("a frame whose zstd stream holds 1 GiB but that declares 4 KiB", {
            file([CraftedSnapshot.Frame(kind: 1, encoding: 1, steps: 0, cells: 0, payloadBytes: 4096,
                                           stored: CraftedSnapshot.zstdZeros(count: gibibyte, omitSize: true))])
        }, "holds no complete snapshot frame: frame 1 does not decode"),
        ("a frame whose zstd header declares 1 GiB, the frame 4 KiB", {
            file([CraftedSnapshot.Frame(kind: 1, encoding: 1, steps: 0, cells: 0, payloadBytes: 4096, stored: CraftedSnapshot.zstdZeros(count: gibibyte))])
        }, "holds no complete snapshot frame: frame 1 does not decode"),
    ]

    @Test("each crafted snapshot is refused with a sentence naming the file, and the peak resident set rises by less than 64 MB",
          arguments: cases.indices)
    func craftedSnapshotIsRefusedCheaply(_ index: Int) throws {
        let (name, makeBytes, refusal) = Self.cases[index]
        let bytes = makeBytes()
        #expect(bytes.count < 1 << 20, "\(name): the crafted file itself should be small (\(bytes.count) bytes)")
        let path = "/queue/snapshots/job-1.kv.zst"
        try resetPeakResidentSet()
        let before = try residentSetKilobytes().now
        do {
            let contents = try SnapshotFile.decode(bytes, path: path, limits: Self.limits, key: SnapshotKey(secret: Self.secret))
            Issue.record("\(name): accepted, \(contents.frames.count) frames")
        } catch {
            #expect(error.description.hasPrefix(path) && error.description.contains(refusal), "\(name): \(error)")
        }
        let rise = try residentSetKilobytes().peak - before
        #expect(rise < 64 << 10, "\(name): the peak resident set rose by \(rise) kB")
    }

    @Test("a file larger than the frames of one state could take is refused before it is read")
    func oversizedFileIsRefusedUnread() throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let url = directory.appendingPathComponent("job-1.kv.zst")
        let limits = SnapshotLimits(maxCells: 8, cellBytes: 16, otherBytes: 1024)
        let handle = try FileHandle(forWritingTo: { FileManager.default.createFile(atPath: url.path, contents: Self.file([])); return url }())
        try handle.truncate(atOffset: UInt64(limits.maxFileBytes + 1))
        try handle.close()
        #expect(throws: SnapshotFileError.tooLarge(path: url.path, reason: "the file has \(limits.maxFileBytes + 1) bytes, more than the frames of one state may take (\(limits.maxFileBytes))")) {
            try SnapshotFile.read(from: url, limits: limits, key: SnapshotKey(secret: Self.secret))
        }
    }

    @Test("frames within the bounds are read as before")
    func framesWithinTheBoundsAreRead() throws {
        let bytes = Self.file([Self.smallFullFrame, CraftedSnapshot.Frame(kind: 2, encoding: 1, steps: 1, cells: 8, payloadBytes: 20_000,
                                                                           stored: CraftedSnapshot.zstdZeros(count: 20_000))])
        let contents = try SnapshotFile.decode(bytes, path: "f", limits: Self.limits, key: SnapshotKey(secret: Self.secret))
        #expect(contents.frames.map(\.cells) == [10, 8] && contents.payloads.map(\.count) == [4096, 20_000] && contents.damage == nil)
        #expect(contents.authenticated)
    }
}
