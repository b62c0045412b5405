// `export --format sidecar`: one caption text file per succeeded job, the layout dataset tools read (kohya-ss,
// taggui and OneTrainer take `image.txt` beside `image.png`).
import Artifacts
import Foundation
import JobQueue

/// Where and how caption sidecars are written.
public struct SidecarOptions: Sendable {
    /// The sidecar's extension, dot included; it replaces the image's own (`cat.png` -> `cat.txt`).
    public var fileExtension = ".txt"
    /// A folder holding a mirrored tree: each image's path relative to the deepest folder that holds the images of
    /// every succeeded job, under this folder. Nil: beside each image.
    public var into: URL? = nil
    /// Replace existing files (otherwise they are skipped and reported).
    public var overwrite = false

    public init(fileExtension: String = ".txt", into: URL? = nil, overwrite: Bool = false) {
        self.fileExtension = fileExtension
        self.into = into
        self.overwrite = overwrite
    }

    /// Nil when the extension is usable, else why not: it must start with a dot and name no folder.
    public static func problem(withExtension text: String) -> String? {
        guard text.count >= 2, text.hasPrefix("."), !text.contains("/"), text != "..", !text.contains("\0") else {
            return "--extension '\(text)' must be a dot and a name, such as .txt or .caption"
        }
        return nil
    }
}

/// What a sidecar export did: the files written, and each job passed over with the reason.
public struct SidecarReport: Sendable, Equatable {
    public struct Skipped: Sendable, Equatable {
        public var jobID: Int64
        public var path: String
        public var reason: String
    }

    public var written: [String] = []
    /// Jobs whose sidecar already existed (without `overwrite`), whose sidecar another job of this export wrote
    /// (the same image captioned twice), or whose sidecar would be the image itself.
    public var skipped: [Skipped] = []
    /// Succeeded jobs whose result file could not be read: their `error` names the file and the cause.
    public var unreadable: [ExportRecord] = []
}

public enum CaptionSidecars {
    /// Writes one sidecar per succeeded job that `filter` selects (other states are passed over silently), by job
    /// id: the caption text as generated, UTF-8, nothing added. Each file is written atomically; without
    /// `overwrite` an existing file is never replaced, even one that appears while the export runs. Throws
    /// `ArtifactError.refusedOutput`, before writing any file, when `into` is not a folder, a symbolic link lies
    /// between it and a sidecar, or (with `overwrite`) a sidecar's place holds something `OutputPath` refuses.
    public static func export(from queue: JobQueue, _ filter: JobFilter, options: SidecarOptions) throws -> SidecarReport {
        var report = SidecarReport()
        var captions: [(jobID: Int64, image: String, text: String)] = []
        var succeeded = filter
        succeeded.states = [.succeeded]
        try ExportRecord.forEach(in: queue, succeeded) { record in
            if record.resultUnreadable {
                report.unreadable.append(record)
            } else if let text = record.text {
                captions.append((record.jobID, record.image, text))
            }
        }
        // Over every succeeded job, readable or not, so that a file unreadable today does not move the others' tree.
        let root = options.into.map { _ in commonFolder(of: captions.map(\.image) + report.unreadable.map(\.image)) }
        let paths = captions.map { sidecarPath(of: $0.image, options: options, root: root) }
        // Every path is checked before the first file is written, so a refusal leaves nothing half exported.
        if let into = options.into {
            try OutputPath.checkDirectory(into.path)
            for path in paths { try checkNoLink(below: into, on: path) }
        }
        if options.overwrite {
            for path in paths { try OutputPath.checkFile(path) }
        }
        var claimed: [String: Int64] = [:]
        for (caption, path) in zip(captions, paths) {
            if path == URL(fileURLWithPath: caption.image).standardizedFileURL.path {
                report.skipped.append(.init(jobID: caption.jobID, path: path, reason: "it would replace the image itself"))
                continue
            }
            if let other = claimed[path] {
                report.skipped.append(.init(jobID: caption.jobID, path: path, reason: "job \(other) of this export wrote it (the same image)"))
                continue
            }
            claimed[path] = caption.jobID
            let url = URL(fileURLWithPath: path)
            if let into = options.into { try checkNoLink(below: into, on: path) }
            try OutputPath.makeDirectory(url.deletingLastPathComponent())
            if options.overwrite {
                try AtomicFile.write(Data(caption.text.utf8), to: url)
                report.written.append(path)
            } else if try writeNew(Data(caption.text.utf8), to: url) {
                report.written.append(path)
            } else {
                report.skipped.append(.init(jobID: caption.jobID, path: path, reason: "it exists (--overwrite replaces it)"))
            }
        }
        return report
    }

    /// Refuses a symbolic link among the folders between `into` and the sidecar at `path` (which lies under it):
    /// following one could write outside the tree `--into` names. `into` itself may be a link; a link in the sidecar's
    /// own place is replaced as a name (with `overwrite`) or skipped, never followed.
    static func checkNoLink(below into: URL, on path: String) throws {
        let top = into.standardizedFileURL.pathComponents, components = URL(fileURLWithPath: path).pathComponents
        guard components.count > top.count + 1 else { return }
        var url = into.standardizedFileURL
        for component in components[top.count ..< components.count - 1] {
            url.appendPathComponent(component)
            var status = stat()
            guard lstat(url.path, &status) == 0 else { return }  // nothing further exists yet
            if status.st_mode & S_IFMT == S_IFLNK {
                throw ArtifactError.refusedOutput(path: url.path, reason: "is a symbolic link inside --into \(into.path); sidecars are not written "
                                                  + "through links, which could lead out of that folder")
            }
        }
    }

    /// `image` with its extension replaced, beside it or mirrored under `options.into` relative to `root`.
    static func sidecarPath(of image: String, options: SidecarOptions, root: String?) -> String {
        let imageURL = URL(fileURLWithPath: image).standardizedFileURL
        let name = imageURL.deletingPathExtension().lastPathComponent + options.fileExtension
        guard let into = options.into, let root else {
            return imageURL.deletingLastPathComponent().appendingPathComponent(name).path
        }
        let folder = imageURL.deletingLastPathComponent().path
        let relative = folder == root ? "" : String(folder.dropFirst(root == "/" ? 1 : root.count + 1))
        var url = into.standardizedFileURL
        if !relative.isEmpty { url.appendPathComponent(relative, isDirectory: true) }
        return url.appendingPathComponent(name).path
    }

    /// The deepest folder that holds every one of `images` (absolute paths).
    static func commonFolder(of images: [String]) -> String {
        let folders = images.map { URL(fileURLWithPath: $0).standardizedFileURL.deletingLastPathComponent().pathComponents }
        guard var common = folders.first else { return "/" }
        for folder in folders.dropFirst() {
            var count = 0
            while count < min(common.count, folder.count) && common[count] == folder[count] { count += 1 }
            common.removeLast(common.count - count)
        }
        return common.isEmpty ? "/" : NSString.path(withComponents: common)
    }

    /// Writes `data` to `url` only when nothing is there: the bytes go atomically to a temporary name, which is then
    /// linked to `url` (link never replaces a file). False when `url` exists.
    static func writeNew(_ data: Data, to url: URL) throws -> Bool {
        var status = stat()
        if lstat(url.path, &status) == 0 { return false }  // anything there, a dangling link included
        let temporary = url.deletingLastPathComponent().appendingPathComponent(".\(url.lastPathComponent).sidecar-\(getpid())")
        try AtomicFile.write(data, to: temporary)
        defer { unlink(temporary.path) }
        guard link(temporary.path, url.path) == 0 else {
            if errno == EEXIST { return false }
            throw ArtifactError.io(path: url.path, operation: "create", reason: String(cString: strerror(errno)))
        }
        return true
    }
}
