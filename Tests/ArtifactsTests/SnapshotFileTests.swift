// The KV snapshot file: an identity header and checksummed frames, read back unchanged; a torn or damaged tail
// ignored (the frames before it used), a file without an intact first frame and every other bad file refused with an
// error naming it, the file left as it was; appending never touches the good frames; the byte shuffle and every
// encoding round-trip.
import Foundation
import Testing
@testable import Artifacts

/// Generous bounds for the tests that are not about them.
let testLimits = SnapshotLimits.absolute(maxBytes: 1 << 30)
/// The queue secret the tests' snapshots are tagged with.
let testKey = SnapshotKey(secret: Data(repeating: 7, count: 32))

@Suite("Snapshot files")
struct SnapshotFileTests {
    let fingerprint = "model-a"
    var identity: SnapshotIdentity {
        SnapshotIdentity(model: fingerprint, queue: "0b5c6e0a-9d57-4f3e-8a36-2f1f3f5e1c11", job: 7, imageSHA256: String(repeating: "ab", count: 32),
                         prompt: "Describe the image.", parameters: #"{"max_tokens":8}"#)
    }

    /// Floats with a slowly varying exponent, as K/V are, as bytes.
    static func floats(_ count: Int, seed: Int) -> Data {
        let values = (0..<count).map { Float(sin(Double($0 + seed) * 0.37)) * Float(1 + ($0 + seed) % 5) }
        return values.withUnsafeBytes { Data($0) }
    }

    /// A full frame and two append frames.
    var frames: [SnapshotFrame] {
        [SnapshotFrame(kind: .full, decodeSteps: 0, cells: 40, payload: Self.floats(12_000, seed: 1), stateBytes: 48_000),
         SnapshotFrame(kind: .append, decodeSteps: 5, cells: 5, payload: Self.floats(1_500, seed: 2), stateBytes: 54_000),
         SnapshotFrame(kind: .append, decodeSteps: 9, cells: 4, payload: Self.floats(1_200, seed: 3), stateBytes: 58_800)]
    }

    @Test("frames are read back in order with their kinds, steps, cells and sizes, in every encoding", arguments: SnapshotEncoding.allCases)
    func roundTrip(_ encoding: SnapshotEncoding) throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let url = directory.appendingPathComponent("job-1.kv.zst")
        let file = try SnapshotFile.encode(frames, identity: identity, encoding: encoding, key: testKey)
        try AtomicFile.write(file, to: url)
        let contents = try SnapshotFile.read(from: url, expected: identity, limits: testLimits, key: testKey)
        #expect(contents.identity == identity && contents.formatVersion == 4 && contents.damage == nil)
        #expect(contents.payloads == frames.map(\.payload))
        #expect(contents.frames.map(\.kind) == [.full, .append, .append] && contents.frames.map(\.decodeSteps) == [0, 5, 9])
        #expect(contents.frames.map(\.cells) == [40, 5, 4] && contents.frames.allSatisfy { $0.encoding == encoding })
        #expect(contents.frames.map(\.payloadBytes) == frames.map(\.payload.count))
        #expect(contents.fileBytes == file.count && contents.goodBytes == file.count)
        if encoding == .shuffledZstd {
            // The shuffle is what makes floats compress: fewer bytes than zstd alone.
            let plain = try SnapshotFile.encode(frames, identity: identity, encoding: .zstd, key: testKey)
            #expect(file.count < plain.count)
        }
    }

    @Test("only the frames from the last full frame on make the state")
    func aLaterFullFrameReplacesEverythingBefore() throws {
        var frames = frames
        frames.append(SnapshotFrame(kind: .full, decodeSteps: 12, cells: 49, payload: Self.floats(14_000, seed: 4), stateBytes: 56_000))
        frames.append(SnapshotFrame(kind: .append, decodeSteps: 14, cells: 2, payload: Self.floats(600, seed: 5), stateBytes: 58_400))
        let contents = try SnapshotFile.decode(try SnapshotFile.encode(frames, identity: identity, key: testKey), path: "f", limits: testLimits, key: testKey)
        #expect(contents.frames.count == 5 && contents.payloads == [frames[3].payload, frames[4].payload])
    }

    @Test("a file cut at any frame boundary or inside a frame, or with a byte flipped in a frame, yields the frames before the damage")
    func tornAndDamagedTails() throws {
        let file = try SnapshotFile.encode(frames, identity: identity, encoding: .shuffledZstd, key: testKey)
        let good = try SnapshotFile.decode(file, path: "good", limits: testLimits, key: testKey)
        let ends = good.frames.map { $0.offset + $0.fileBytes }
        let headerEnd = good.frames[0].offset
        func check(_ bytes: Data, intactFrames: Int, name: String) {
            guard intactFrames > 0 else {
                do {
                    _ = try SnapshotFile.decode(bytes, path: "torn.kv.zst", limits: testLimits, key: testKey)
                    Issue.record("\(name): accepted")
                } catch {
                    guard case .noCompleteFrame(let path, _) = error else { Issue.record("\(name): \(error)"); return }
                    #expect(path == "torn.kv.zst" && error.description.hasPrefix("torn.kv.zst holds no complete snapshot frame: "), "\(name)")
                }
                return
            }
            do {
                let contents = try SnapshotFile.decode(bytes, path: "torn.kv.zst", limits: testLimits, key: testKey)
                #expect(contents.frames.count == intactFrames, "\(name)")
                #expect(contents.payloads == frames.prefix(intactFrames).map(\.payload), "\(name)")
                #expect(contents.goodBytes == ends[intactFrames - 1], "\(name)")
                #expect((contents.damage == nil) == (bytes.count == contents.goodBytes), "\(name)")
                #expect(contents.damage.map { $0.offset == ends[intactFrames - 1] } ?? true, "\(name)")
            } catch {
                Issue.record("\(name): \(error)")
            }
        }
        for (index, frame) in good.frames.enumerated() {
            let inside = [1, 4, SnapshotFile.frameHeaderSize - 1, SnapshotFile.frameHeaderSize, SnapshotFile.frameHeaderSize + frame.storedBytes / 2,
                          frame.fileBytes - 1]
            var cuts = inside.map { (frame.offset + $0, "cut at byte \($0) of frame \(index + 1)") }
            cuts.append((ends[index], "cut after frame \(index + 1)"))
            for (length, name) in cuts {
                let expectedFrames = length == ends[index] ? index + 1 : index
                check(file.prefix(length), intactFrames: expectedFrames, name: name)
            }
            for position in [0, 4, 5, 8, 20, 33, 40, 71, SnapshotFile.frameHeaderSize + frame.storedBytes / 3, frame.fileBytes - 1] {
                var damaged = file
                damaged[frame.offset + position] ^= 0x20
                check(damaged, intactFrames: index, name: "byte \(position) of frame \(index + 1) flipped")
            }
        }
        // Garbage after the last frame is a torn tail too.
        check(file + Data(repeating: 7, count: 100), intactFrames: 3, name: "garbage after the last frame")
        // A file that ends with its header has no state.
        check(file.prefix(headerEnd), intactFrames: 0, name: "header alone")
    }

    @Test("bad magic, an unknown or old version, another model, a cut header and a first frame that is not full are refused, naming the file")
    func badFilesAreRefused() throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let good = try SnapshotFile.encode(frames, identity: identity, key: testKey)
        let headerEnd = SnapshotFile.header(identity, key: testKey).count
        func damaged(_ change: (inout Data) -> Void) -> Data {
            var data = good
            change(&data)
            return data
        }
        let appendFirst = SnapshotFile.header(identity, key: testKey)
            + (try SnapshotFile.frame(frames[1], key: testKey, header: SnapshotFile.header(identity, key: testKey), offset: headerEnd))
        let cases: [(String, Data, (String) -> SnapshotFileError?)] = [
            ("magic", damaged { $0[0] = UInt8(ascii: "X") }, { .notASnapshot(path: $0) }),
            ("version", damaged { $0[8] = 9 }, { .unsupportedVersion(path: $0, version: 9, supported: 4) }),
            ("version 2", damaged { $0[8] = 2 }, { .unsupportedVersion(path: $0, version: 2, supported: 4) }),
            ("version 1", damaged { $0[8] = 1 }, { .unsupportedVersion(path: $0, version: 1, supported: 4) }),
            ("version 3", damaged { $0[8] = 3 }, { .unsupportedVersion(path: $0, version: 3, supported: 4) }),
            ("model", try SnapshotFile.encode(frames, identity: { var other = identity; other.model = "bodel-a"; return other }(), key: testKey),
             { .differentModel(path: $0, found: "bodel-a", expected: "model-a") }),
            ("header edited", damaged { $0[16] = UInt8(ascii: "b") },
             { .notAuthentic(path: $0, reason: "its header fails its HMAC check (edited, or written for another queue)") }),
            ("another queue's secret", try SnapshotFile.encode(frames, identity: identity, key: SnapshotKey(secret: Data(repeating: 8, count: 32))),
             { .notAuthentic(path: $0, reason: "its header fails its HMAC check (edited, or written for another queue)") }),
            ("header cut", good.prefix(headerEnd - 20), { .truncated(path: $0) }),
            ("first frame cut", good.prefix(headerEnd + 100), { _ in nil }),
            ("append frame first", appendFirst, { .noCompleteFrame(path: $0, reason: "its first frame is an append frame, not a full one") }),
            ("empty", Data(), { .notASnapshot(path: $0) }),
        ]
        for (name, bytes, expected) in cases {
            let url = directory.appendingPathComponent("\(name).kv.zst")
            try bytes.write(to: url)
            do {
                _ = try SnapshotFile.read(from: url, expected: identity, limits: testLimits, key: testKey)
                Issue.record("\(name): accepted")
            } catch {
                #expect(error.path == url.path, "\(name)")
                #expect(error.description.contains(url.path), "\(name)")
                if let expected = expected(url.path) {
                    #expect(error == expected, "\(name): \(error)")
                } else if case .noCompleteFrame = error {
                } else {
                    Issue.record("\(name): \(error)")
                }
            }
            #expect(try Data(contentsOf: url) == bytes, "\(name): the file changed")
        }
        let missing = directory.appendingPathComponent("none").path
        let error = #expect(throws: SnapshotFileError.self) { try SnapshotFile.read(from: URL(fileURLWithPath: missing), limits: testLimits, key: testKey) }
        #expect(error?.path == missing && error?.description.hasPrefix("cannot read the snapshot \(missing)") == true)
    }

    @Test("a snapshot is refused for any other job, queue, image, prompt or parameters, naming the file and the difference")
    func anotherJobsSnapshotIsRefused() throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let url = directory.appendingPathComponent("job-7.kv.zst")
        try AtomicFile.write(try SnapshotFile.encode(frames, identity: identity, key: testKey), to: url)
        let before = try Data(contentsOf: url)
        var otherJob = identity, otherQueue = identity, otherImage = identity, otherPrompt = identity, otherParameters = identity, otherModel = identity
        otherJob.job = 8
        otherQueue.queue = "5f0d3a7e-1111-4c2b-9a0e-0123456789ab"
        otherImage.imageSHA256 = String(repeating: "cd", count: 32)
        otherPrompt.prompt = "Describe another image."
        otherParameters.parameters = #"{"max_tokens":9}"#
        otherModel.model = "model-b"
        let cases: [(SnapshotIdentity, String)] = [
            (otherJob, "it was written for job 7 of queue \(identity.queue), not job 8 of queue \(identity.queue)"),
            (otherQueue, "it was written for job 7 of queue \(identity.queue), not job 7 of queue \(otherQueue.queue)"),
            (otherImage, "it was taken for an image with sha256 \(identity.imageSHA256), the job's image has \(otherImage.imageSHA256)"),
            (otherPrompt, "it was taken for another prompt"),
            (otherParameters, #"it was taken with parameters {"max_tokens":8}, the job asks for {"max_tokens":9}"#),
        ]
        for (expected, reason) in cases {
            let error = #expect(throws: SnapshotFileError.self) { try SnapshotFile.read(from: url, expected: expected, limits: testLimits, key: testKey) }
            #expect(error == .differentJob(path: url.path, reason: reason))
            #expect(error?.description == "\(url.path) does not belong to this job: \(reason)")
        }
        let error = #expect(throws: SnapshotFileError.self) { try SnapshotFile.read(from: url, expected: otherModel, limits: testLimits, key: testKey) }
        #expect(error == .differentModel(path: url.path, found: "model-a", expected: "model-b"))
        #expect(try Data(contentsOf: url) == before)
    }

    @Test("an append cuts a torn tail back to the good frames first, never rewrites them, and refuses a file shorter than what was written")
    func appendingKeepsTheGoodPrefix() throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let url = directory.appendingPathComponent("job-7.kv.zst")
        let first = try SnapshotFile.encode([frames[0]], identity: identity, key: testKey)
        try AtomicFile.write(first, to: url)
        let header = SnapshotFile.header(identity, key: testKey)
        let second = try SnapshotFile.frame(frames[1], key: testKey, header: header, offset: first.count)
        let third = try SnapshotFile.frame(frames[2], key: testKey, header: header, offset: first.count + second.count)
        try AppendFile.append(second, to: url, at: first.count)
        // A crash in the middle of the next append leaves half a frame.
        let handle = try FileHandle(forWritingTo: url)
        try handle.seekToEnd()
        try handle.write(contentsOf: third.prefix(third.count / 2))
        try handle.close()
        #expect(try SnapshotFile.read(from: url, limits: testLimits, key: testKey).frames.count == 2)
        try AppendFile.append(third, to: url, at: first.count + second.count)
        #expect(try Data(contentsOf: url) == first + second + third)
        #expect(try SnapshotFile.read(from: url, expected: identity, limits: testLimits, key: testKey).payloads == frames.map(\.payload))

        let error = #expect(throws: ArtifactError.self) { try AppendFile.append(third, to: url, at: first.count + second.count + third.count + 1) }
        #expect(error?.description.contains(url.path) == true)
        #expect(try Data(contentsOf: url) == first + second + third)
        #expect(throws: ArtifactError.self) { try AppendFile.append(third, to: directory.appendingPathComponent("none"), at: 0) }
    }

    @Test("unshuffle undoes shuffle for every element width and length, and the shuffle groups the bytes of each place")
    func byteShuffleRoundTrip() {
        let bytes = Data((0..<1_003).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) })
        for width in [1, 2, 3, 4, 8] {
            for length in [0, 1, 3, 4, 5, 64, 1_003] {
                let data = bytes.prefix(length)
                let shuffled = ByteShuffle.shuffle(data, width: width)
                #expect(shuffled.count == data.count)
                #expect(ByteShuffle.unshuffle(shuffled, width: width) == data, "width \(width), length \(length)")
            }
        }
        #expect(ByteShuffle.shuffle(Data([1, 2, 3, 4, 5, 6, 7, 8, 9]), width: 4) == Data([1, 5, 2, 6, 3, 7, 4, 8, 9]))
    }
}
