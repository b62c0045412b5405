// `dllava --version` and the source commit Scripts/stamp-source-commit records for it, from a checkout and from a
// tarball made by `git archive`.
import CommandLineSupport
import Foundation
import Testing

@Suite("dllava --version and the recorded source commit")
struct InstallTests {
    static let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    /// Runs `executable arguments` in `directory`; standard output and the exit status.
    func shell(_ executable: String, _ arguments: [String], in directory: URL) throws -> (status: Int32, output: String) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        process.currentDirectoryURL = directory
        let output = Pipe()
        process.standardOutput = output
        process.standardError = FileHandle.nullDevice
        try process.run()
        let data = output.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return (process.terminationStatus, String(decoding: data, as: UTF8.self))
    }

    @Test func versionPrintsTheReleaseAndTheSourceCommit() throws {
        let result = try runDLLaVA(["--version"])
        #expect(result.status == 0)
        let pattern = #/^\d+\.\d+\.\d+ \(commit ([0-9a-f]{40}(\+changes)?|unknown)\)\n$/#
        #expect(result.standardOutput.wholeMatch(of: pattern) != nil, "\(result.standardOutput)")
    }

    /// A copy of the repository's tracked files as `git archive` makes it (the commit filled into
    /// Scripts/source-commit.txt), and the same files with that line as committed, as a plain copy has it.
    @Test func aTarballKnowsItsCommitAndAPlainCopySaysUnknown() throws {
        guard try shell("/usr/bin/env", ["git", "rev-parse", "--is-inside-work-tree"], in: Self.repository).status == 0 else {
            return  // a tarball itself: nothing to archive from
        }
        let head = try shell("/usr/bin/env", ["git", "rev-parse", "HEAD"], in: Self.repository).output.trimmingCharacters(in: .whitespacesAndNewlines)
        let scratch = FileManager.default.temporaryDirectory.appendingPathComponent("dllava-archive-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: scratch, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: scratch) }
        let tarball = scratch.appendingPathComponent("source.tar").path
        #expect(try shell("/usr/bin/env", ["git", "archive", "--format=tar", "-o", tarball, "HEAD", "Scripts", "Sources/CBuildInfo"], in: Self.repository).status == 0)
        #expect(try shell("/usr/bin/env", ["tar", "-xf", tarball], in: scratch).status == 0)

        let archived = try shell(scratch.appendingPathComponent("Scripts/stamp-source-commit").path, [], in: scratch)
        #expect(archived.status == 0 && archived.output == "\(head)\n")
        let header = try String(contentsOf: scratch.appendingPathComponent("Sources/CBuildInfo/source_commit.h"), encoding: .utf8)
        #expect(header == "#define DL_SOURCE_COMMIT \"\(head)\"\n")

        try Data("$Format:%H$\n".utf8).write(to: scratch.appendingPathComponent("Scripts/source-commit.txt"))
        let plain = try shell(scratch.appendingPathComponent("Scripts/stamp-source-commit").path, [], in: scratch)
        #expect(plain.status == 0 && plain.output == "unknown\n")
        let unknownHeader = try String(contentsOf: scratch.appendingPathComponent("Sources/CBuildInfo/source_commit.h"), encoding: .utf8)
        #expect(unknownHeader == "#define DL_SOURCE_COMMIT \"unknown\"\n")
    }

    /// The layout Scripts/install makes, `<prefix>/bin/dllava` and `<prefix>/share/dllava/models/dllava-scenes`:
    /// run by name from PATH, with neither --model nor $DLLAVA_MODEL, dllava finds the installed model.
    @Test func anInstalledDllavaFindsItsDefaultModel() throws {
        let prefix = FileManager.default.temporaryDirectory.appendingPathComponent("dllava-prefix-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: prefix) }
        let bin = prefix.appendingPathComponent("bin"), models = prefix.appendingPathComponent("share/dllava/models")
        try FileManager.default.createDirectory(at: bin, withIntermediateDirectories: true)
        try FileManager.default.createDirectory(at: models, withIntermediateDirectories: true)
        let installed = bin.appendingPathComponent("dllava")
        if link(dllavaExecutable.path, installed.path) != 0 { try FileManager.default.copyItem(at: dllavaExecutable, to: installed) }
        try FileManager.default.copyItem(at: Self.repository.appendingPathComponent("Jobs/models/dllava-scenes"),
                                         to: models.appendingPathComponent("dllava-scenes"))
        var environment = ProcessInfo.processInfo.environment
        environment["DLLAVA_MODEL"] = nil
        environment["PATH"] = bin.path + ":/usr/bin:/bin"
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["dllava", "tokenize", "--text", "a red circle", "--json"]
        process.environment = environment
        let output = Pipe()
        process.standardOutput = output
        process.standardError = FileHandle.nullDevice
        try process.run()
        let data = output.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        #expect(process.terminationStatus == 0)
        #expect(String(decoding: data, as: UTF8.self).hasPrefix("{\"ids\":[1,"), "\(String(decoding: data, as: UTF8.self))")
        // Not installed (the build folder has no share/ beside it): no model, a usage error.
        var bare = environment
        bare["PATH"] = "/usr/bin:/bin"
        let result = try runDLLaVA(["tokenize", "--text", "a red circle"], environment: bare)
        #expect(result.status == 64 && result.standardError.contains("no model"))
    }
}
