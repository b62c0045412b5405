// The library example `dllava-example-caption` (Sources/dllava-example-caption) run as a user runs it, on the
// shipped demo model: it must keep building, captioning, and failing as the command line does.
import CommandLineSupport
import Foundation
import Testing

/// The example executable, built beside the test bundle as `dllava` is.
let exampleExecutable = dllavaExecutable.deletingLastPathComponent().appendingPathComponent("dllava-example-caption")

@Suite("The library example dllava-example-caption")
struct LibraryExampleTests {
    static let jobs = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../../Jobs").standardizedFileURL
    static let model = jobs.appendingPathComponent("models/dllava-scenes").path

    @Test("captions a sample scene as dllava generate does with the same settings", arguments: ["test_000000.png", "test_000002.png"])
    func captionsAsTheCommandLineDoes(image name: String) throws {
        let image = Self.jobs.appendingPathComponent("samples/\(name)").path
        let example = try runDLLaVA([Self.model, image], executable: exampleExecutable)
        #expect(example.status == 0, "\(example.standardError)")
        #expect(example.standardOutput.hasPrefix("There "), "\(example.standardOutput)")
        let command = try runDLLaVA(["generate", "--model", Self.model, "--image", image, "--prompt", "Describe the image.",
                                     "--max-tokens", "64", "--precision", "f32"])
        #expect(command.status == 0, "\(command.standardError)")
        #expect(example.standardOutput == command.standardOutput)
    }

    @Test("a truncated image is one sentence naming the file and exit code 65; wrong arguments exit 64")
    func failsAsTheCommandLineDoes() throws {
        let image = Self.jobs.appendingPathComponent("../Tests/Fixtures/images/bad_truncated.jpg").standardizedFileURL.path
        let broken = try runDLLaVA([Self.model, image], executable: exampleExecutable)
        #expect(broken.status == 65)
        #expect(broken.standardOutput.isEmpty)
        #expect(broken.errorLines.count == 1 && broken.standardError.contains("bad_truncated.jpg"), "\(broken.standardError)")

        let usage = try runDLLaVA([Self.model], executable: exampleExecutable)
        #expect(usage.status == 64)
        #expect(usage.standardError.hasPrefix("usage: dllava-example-caption"))
    }
}
