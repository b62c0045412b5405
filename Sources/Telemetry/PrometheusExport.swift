// The run's metrics in Prometheus's text format, two ways out: a node_exporter textfile written atomically (for cron
// runs), and `/metrics` served over HTTP (for a daemon under systemd).
import Artifacts
import CoreMetrics
import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import Prometheus

/// A registry of Prometheus metrics and the swift-metrics factory that fills it.
public final class MetricsRegistry: Sendable {
    public let registry: PrometheusCollectorRegistry
    public let factory: PrometheusMetricsFactory

    /// Histogram buckets for every timer: from a millisecond (a decode step of a small model) to two minutes (the
    /// prefill of a large batch on a 7B model).
    public static let durationBuckets: [Duration] = [
        .milliseconds(1), .milliseconds(5), .milliseconds(10), .milliseconds(25), .milliseconds(50), .milliseconds(100),
        .milliseconds(250), .milliseconds(500), .seconds(1), .milliseconds(2500), .seconds(5), .seconds(10), .seconds(30),
        .seconds(60), .seconds(120),
    ]

    public init() {
        registry = PrometheusCollectorRegistry()
        var factory = PrometheusMetricsFactory(registry: registry)
        factory.defaultDurationHistogramBuckets = Self.durationBuckets
        self.factory = factory
    }

    /// Every metric in the text exposition format (version 0.0.4).
    public func text() -> String { registry.emitToString() }

    /// Writes `text()` to `url` atomically (a temporary file in the same folder, renamed over it), as node_exporter's
    /// textfile collector needs: it never reads a half-written file, and ignores the temporary one (not `*.prom`).
    public func writeTextFile(to url: URL) throws {
        try AtomicFile.write(Data(text().utf8), to: url)
    }
}

/// Serves `GET /metrics` over HTTP/1.1 on one event-loop thread; other paths get 404, other methods 405.
public final class MetricsServer: Sendable {
    let group: MultiThreadedEventLoopGroup
    let channel: any Channel
    /// The port bound (the one asked for, or the one the system chose for 0).
    public let port: Int

    /// Binds `host:port` (loopback by default: metrics are for a scraper on this machine, or behind a proxy).
    public init(registry: MetricsRegistry, host: String = "127.0.0.1", port: Int) throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline()
                    try channel.pipeline.syncOperations.addHandler(MetricsHandler(registry: registry))
                }
            }
        do {
            channel = try bootstrap.bind(host: host, port: port).wait()
        } catch {
            try? group.syncShutdownGracefully()
            throw MetricsServerError(host: host, port: port, reason: "\(error)")
        }
        self.group = group
        self.port = channel.localAddress?.port ?? port
    }

    /// Stops listening and ends the event-loop thread.
    public func close() {
        try? channel.close().wait()
        try? group.syncShutdownGracefully()
    }
}

public struct MetricsServerError: Error, CustomStringConvertible {
    public var host: String
    public var port: Int
    public var reason: String
    public var description: String { "cannot serve metrics on \(host):\(port): \(reason)" }
}

/// Answers one request at a time per connection.
final class MetricsHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    let registry: MetricsRegistry
    var head: HTTPRequestHead?

    init(registry: MetricsRegistry) {
        self.registry = registry
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head): self.head = head
        case .body: break
        case .end:
            guard let head else { return }
            self.head = nil
            let (status, contentType, body) = response(to: head)
            var headers = HTTPHeaders()
            headers.add(name: "Content-Type", value: contentType)
            headers.add(name: "Content-Length", value: "\(body.utf8.count)")
            if !head.isKeepAlive { headers.add(name: "Connection", value: "close") }
            context.write(wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: status, headers: headers))), promise: nil)
            if head.method != .HEAD {
                context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: body)))), promise: nil)
            }
            let written = context.writeAndFlush(wrapOutboundOut(.end(nil)))
            if !head.isKeepAlive {
                written.assumeIsolated().whenComplete { _ in context.close(promise: nil) }
            }
        }
    }

    func response(to head: HTTPRequestHead) -> (HTTPResponseStatus, String, String) {
        let path = head.uri.split(separator: "?", maxSplits: 1).first.map(String.init) ?? head.uri
        guard path == "/metrics" else { return (.notFound, "text/plain; charset=utf-8", "not found: metrics are at /metrics\n") }
        guard head.method == .GET || head.method == .HEAD else { return (.methodNotAllowed, "text/plain; charset=utf-8", "GET /metrics\n") }
        return (.ok, "text/plain; version=0.0.4; charset=utf-8", registry.text())
    }
}

/// Rewrites a node_exporter textfile as a run goes: when jobs have finished since the last write, or `interval`
/// after it, and on `finish`. A failed write never stops the run: the caller is told of the first failure, and again
/// only after a write has succeeded in between.
public final class MetricsFileWriter: @unchecked Sendable {
    public let registry: MetricsRegistry
    public let url: URL
    public let interval: Double
    private let lock = NSLock()
    private var lastDone = -1
    private var lastWrite = Date.distantPast
    private var failing = false
    private let failed: @Sendable (String) -> Void

    public init(registry: MetricsRegistry, url: URL, interval: Double = 10, failed: @escaping @Sendable (String) -> Void) {
        self.registry = registry
        self.url = url
        self.interval = interval
        self.failed = failed
    }

    /// Writes the file at once; throws when it cannot (a run checks this before it starts).
    public func write() throws {
        try lock.withLock {
            try registry.writeTextFile(to: url)
            lastWrite = Date()
        }
    }

    /// Called at every step boundary with the number of jobs the run has finished.
    public func update(done: Int) {
        lock.withLock {
            guard done != lastDone || Date().timeIntervalSince(lastWrite) >= interval else { return }
            lastDone = done
            writeReportingFailure()
        }
    }

    /// The last write, at the end of a run.
    public func finish() {
        lock.withLock { writeReportingFailure() }
    }

    private func writeReportingFailure() {
        do {
            try registry.writeTextFile(to: url)
            failing = false
        } catch {
            if !failing { failed("cannot write the metrics file \(url.path): \(error); the run goes on") }
            failing = true
        }
        lastWrite = Date()
    }
}
