// Model fingerprints by content, and the digest cache that spares re-reading an unchanged checkpoint.
import Foundation
import Testing
@testable import Artifacts

@Suite("Content fingerprints")
struct ContentFingerprintTests {
    @Test("a model rewritten with other bytes of the same size gets another fingerprint")
    func sameSizeOtherContentIsTold() throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let weights = directory.appendingPathComponent("model.safetensors"), config = directory.appendingPathComponent("config.json")
        try Data(repeating: 1, count: 4096).write(to: weights)
        try Data("{}".utf8).write(to: config)
        let files = [(label: "model/config.json", url: config), (label: "model/model.safetensors", url: weights)]
        let before = try ModelFingerprint.content(of: files, name: "m", cache: FileDigestCache(location: nil))
        try Data(repeating: 2, count: 4096).write(to: weights)
        let after = try ModelFingerprint.content(of: files, name: "m", cache: FileDigestCache(location: nil))
        #expect(before.fingerprint != after.fingerprint && before.name == "m")
    }

    @Test("the digest cache reads an unchanged file once across runs, and again once it is rewritten or replaced")
    func unchangedFilesAreReadOnce() throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let weights = directory.appendingPathComponent("model.safetensors"), location = directory.appendingPathComponent("cache/digests.json")
        try Data(repeating: 1, count: 4096).write(to: weights)
        let first = FileDigestCache(location: location)
        let digest = try first.sha256(ofFileAt: weights)
        #expect(digest == Checksum.sha256Hex(Data(repeating: 1, count: 4096)) && first.filesHashed == 1)
        try first.save()

        let second = FileDigestCache(location: location)
        #expect(try second.sha256(ofFileAt: weights) == digest && second.filesHashed == 0)

        // Same size, and the modification time put back: the status-change time still gives it away.
        let modified = try FileManager.default.attributesOfItem(atPath: weights.path)[.modificationDate] as! Date
        try Data(repeating: 2, count: 4096).write(to: weights)
        try FileManager.default.setAttributes([.modificationDate: modified], ofItemAtPath: weights.path)
        let third = FileDigestCache(location: location)
        #expect(try third.sha256(ofFileAt: weights) == Checksum.sha256Hex(Data(repeating: 2, count: 4096)) && third.filesHashed == 1)
    }

    @Test("a cache file that is damaged or of another version is ignored, not trusted")
    func aBadCacheFileIsIgnored() throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let weights = directory.appendingPathComponent("w.safetensors"), location = directory.appendingPathComponent("digests.json")
        try Data(repeating: 3, count: 100).write(to: weights)
        for contents in ["not json", #"{"format_version": 2, "files": []}"#] {
            try Data(contents.utf8).write(to: location)
            let cache = FileDigestCache(location: location)
            #expect(try cache.sha256(ofFileAt: weights) == Checksum.sha256Hex(Data(repeating: 3, count: 100)) && cache.filesHashed == 1)
        }
    }
}
