import ArgumentParser
import Foundation

@main
struct DLLaVA: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dllava",
        abstract: "Batch captioning with Dynamic-LLaVA on CPU.",
        version: BuildInfo.versionLine,
        subcommands: [Generate.self, Tokenize.self, Flops.self, Quantize.self, Run.self, Snapshot.self, Doctor.self] + queueSubcommands)
}

/// A failure the CLI reports as one sentence on stderr with a sysexits-style code:
/// 64 usage, 65 bad input data, 75 temporarily unavailable, 78 configuration, 1 anything else.
struct CommandFailure: Error {
    let message: String
    let code: Int32
}

extension ParsableCommand {
    /// Runs `body`, turning any error into a message on stderr and the matching exit code.
    func reportingFailures(_ body: () throws -> Void) throws {
        do {
            try body()
        } catch let failure as CommandFailure {
            FileHandle.standardError.write(Data("dllava: \(failure.message)\n".utf8))
            throw ExitCode(failure.code)
        } catch let error as ExitCode {
            throw error
        } catch {
            let (message, code) = describe(error)
            FileHandle.standardError.write(Data("dllava: \(message)\n".utf8))
            throw ExitCode(code)
        }
    }
}
