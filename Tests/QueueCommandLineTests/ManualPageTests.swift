// The manual page and shell completions that Scripts/install installs, as Scripts/manual makes them: the page lists
// every subcommand of the real command tree, in its order, and man renders it; every completion script offers them.
import CommandLineSupport
import Foundation
import Testing

/// The folder Scripts/manual filled (laid out as `$PREFIX/share`); Scripts/test makes it before the suite and names it.
let generatedShare = ProcessInfo.processInfo.environment["DLLAVA_GENERATED_SHARE"].map { URL(fileURLWithPath: $0) }

@Suite("The manual page and completions",
       .enabled(if: generatedShare != nil, "DLLAVA_GENERATED_SHARE is not set: Scripts/test sets it to the folder of Scripts/manual DIR debug"))
struct ManualPageTests {
    /// A command of the tree `dllava --experimental-dump-help` prints: the JSON that swift-argument-parser makes from the
    /// command definitions (what generate-manual reads too).
    struct Command: Decodable {
        let commandName: String
        let aliases: [String]?
        let shouldDisplay: Bool?
        let subcommands: [Command]?
        /// How the manual page titles the command: its name, then its aliases.
        var label: String { ([commandName] + (aliases ?? [])).joined(separator: ", ") }
    }
    struct ToolInfo: Decodable { let command: Command }

    /// Every subcommand below `dllava`, depth first in definition order (as the page lists them), with its path of names.
    func subcommands() throws -> [(path: [String], command: Command)] {
        let dump = try runDLLaVA(["--experimental-dump-help"])
        try #require(dump.status == 0, "\(dump.standardError)")
        let root = try JSONDecoder().decode(ToolInfo.self, from: Data(dump.standardOutput.utf8)).command
        var found: [(path: [String], command: Command)] = []
        func walk(_ command: Command, _ path: [String]) {
            for subcommand in command.subcommands ?? [] where subcommand.shouldDisplay ?? true {
                found.append((path + [subcommand.commandName], subcommand))
                walk(subcommand, path + [subcommand.commandName])
            }
        }
        walk(root, [])
        return found
    }

    /// The top-level subcommands `dllava --help` lists under SUBCOMMANDS (a check that the dump is the tree users see).
    func helpSubcommands() throws -> [String] {
        let help = try runDLLaVA(["--help"])
        try #require(help.status == 0, "\(help.standardError)")
        let lines = help.standardOutput.split(separator: "\n", omittingEmptySubsequences: false)
        let start = try #require(lines.firstIndex(of: "SUBCOMMANDS:"))
        return lines[(start + 1)...].prefix { !$0.isEmpty }.compactMap { line in
            line.hasPrefix("  ") && !line.hasPrefix("   ") ? line.split(separator: " ").first.map(String.init) : nil
        }
    }

    @Test("the page lists every subcommand of the command tree in order, and man -l renders each")
    func thePageNamesEverySubcommand() throws {
        let share = try #require(generatedShare)
        let subcommands = try subcommands()
        let topLevel = subcommands.filter { $0.path.count == 1 }.map(\.command.commandName)
        #expect(topLevel.filter { $0 != "help" } == (try helpSubcommands()).filter { $0 != "help" }, "the dumped tree differs from --help")
        #expect(topLevel.count >= 2)

        let page = share.appendingPathComponent("man/man1/dllava.1")
        let source = try String(contentsOf: page, encoding: .utf8)
        let titled = source.split(separator: "\n").compactMap { line in line.hasPrefix(".It Em ") ? String(line.dropFirst(7)) : nil }
        #expect(titled == subcommands.map(\.command.label))
        #expect(source.contains(".Dt DLLAVA 1"))

        let rendered = try runDLLaVA(["-c", "MANWIDTH=100 man -l \"$0\" | col -b", page.path], executable: URL(fileURLWithPath: "/bin/sh"))
        // groff notes each empty line that a multi-paragraph help text leaves in the page; anything else is a fault.
        let complaints = rendered.errorLines.filter { !$0.hasPrefix("mdoc warning: Empty input line") }
        #expect(rendered.status == 0 && complaints.isEmpty, "\(complaints)")
        let renderedLines = rendered.standardOutput.split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) }
        for heading in ["NAME", "SYNOPSIS", "DESCRIPTION"] {
            #expect(renderedLines.contains(heading), "the rendered page lacks \(heading)")
        }
        // A list item's title starts its line, alone or followed by the start of its text (a short title).
        for (path, command) in subcommands {
            let titles = renderedLines.contains { $0 == command.label || $0.hasPrefix(command.label + " ") || $0.hasPrefix(command.label + "\t") }
            #expect(titles, "the rendered page lacks \(path.joined(separator: " "))")
        }
    }

    @Test("the bash, zsh and fish completions offer every subcommand; the bash script parses")
    func theCompletionsOfferEverySubcommand() throws {
        let share = try #require(generatedShare)
        let names = Set(try subcommands().map(\.command.commandName))
        for file in ["bash-completion/completions/dllava", "zsh/site-functions/_dllava", "fish/vendor_completions.d/dllava.fish"] {
            let script = try String(contentsOf: share.appendingPathComponent(file), encoding: .utf8)
            for name in names {
                #expect(script.contains(name), "\(file) lacks \(name)")
            }
        }
        let bash = try runDLLaVA(["-n", share.appendingPathComponent("bash-completion/completions/dllava").path],
                                 executable: URL(fileURLWithPath: "/bin/bash"))
        #expect(bash.status == 0, "\(bash.standardError)")
    }
}
