// swift-tools-version:6.0
import PackageDescription

// Targets form a layered DAG; see docs/ARCHITECTURE.md ("Module map").
let package = Package(
    name: "dllava",
    platforms: [.macOS(.v14)],
    products: [
        .executable(name: "dllava", targets: ["dllava"]),
        .executable(name: "dllava-bench", targets: ["dllava-bench"]),
        .executable(name: "dllava-queue-bench", targets: ["dllava-queue-bench"]),
        .executable(name: "dllava-report-bench", targets: ["dllava-report-bench"]),
        // The engine as a library: load a checkpoint, turn an image and a question into a request, generate (one call
        // or a step-driven batch). Its modules are listed so that an app can import the types its API shows.
        .library(name: "DynamicLLaVA", targets: ["DynamicLLaVA", "Numerics", "SafeTensors", "Tokenizer", "Imaging", "Vision", "Llama",
                                                 "Sparsification"]),
        // The queue contract (`JobQueue`, `Job`, errors, manifests) and its SQLite implementation.
        .library(name: "JobQueue", targets: ["JobQueue"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/groue/GRDB.swift", from: "7.0.0"),
        .package(url: "https://github.com/apple/swift-crypto", from: "3.0.0"),
        .package(url: "https://github.com/vapor/postgres-nio", from: "1.21.0"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.65.0"),
        .package(url: "https://github.com/apple/swift-nio-ssl", from: "2.37.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.4.1"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
        // `swift package generate-documentation --target DynamicLLaVA` (or JobQueue): the DocC catalogs.
        .package(url: "https://github.com/swiftlang/swift-docc-plugin", from: "1.5.0"),
    ],
    targets: [
        // System libraries (Debian -dev packages, installed by Scripts/setup).
        .systemLibrary(name: "CBLAS", pkgConfig: "openblas", providers: [.apt(["libopenblas-dev"])]),
        .systemLibrary(name: "CZstd", pkgConfig: "libzstd", providers: [.apt(["libzstd-dev"])]),
        .systemLibrary(name: "CJPEG", pkgConfig: "libturbojpeg", providers: [.apt(["libturbojpeg0-dev"])]),
        .systemLibrary(name: "CPNG", pkgConfig: "spng", providers: [.apt(["libspng-dev"])]),
        // Matrix kernels on weights as stored and dtype conversion, with run-time CPU dispatch
        // (scalar, AVX2+FMA+F16C, AVX-512); the only C the project holds.
        .target(name: "CKernels", cSettings: [.unsafeFlags(["-O3"])]),
        // The source commit `dllava --version` prints, recorded by Scripts/stamp-source-commit.
        .target(name: "CBuildInfo"),

        .target(name: "Numerics", dependencies: ["CKernels"]),
        .target(name: "SafeTensors", dependencies: ["Numerics"]),
        // LLaMA's sentencepiece tokenizer and the LLaVA prompt (Foundation only).
        .target(name: "Tokenizer"),
        // Image files -> RGB pixels -> CLIP pixel values, as LLaVA-1.5's Python pipeline computes them.
        .target(name: "Imaging", dependencies: ["CJPEG", "CPNG"]),
        .target(name: "Vision", dependencies: ["Numerics", "SafeTensors"]),
        .target(name: "Llama", dependencies: ["CKernels", "Numerics", "SafeTensors"]),
        .target(name: "Sparsification", dependencies: ["Numerics", "SafeTensors"]),
        .target(name: "DynamicLLaVA", dependencies: ["Numerics", "SafeTensors", "Tokenizer", "Imaging", "Vision", "Llama", "Sparsification"]),
        // Durable job state in SQLite and the manifest readers; never imports the model. Crypto hashes images and
        // idempotency keys at enqueue.
        .target(name: "JobQueue", dependencies: [
            .product(name: "GRDB", package: "GRDB.swift"),
            .product(name: "Crypto", package: "swift-crypto"),
        ]),
        // The same queue contract on PostgreSQL, for many machines sharing one queue (SKIP LOCKED claims, LISTEN/NOTIFY),
        // with result records and KV snapshots stored in the database.
        .target(name: "PostgresQueue", dependencies: [
            "JobQueue", .product(name: "PostgresNIO", package: "postgres-nio"), .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"), .product(name: "NIOSSL", package: "swift-nio-ssl"),
            .product(name: "Logging", package: "swift-log"), .product(name: "Crypto", package: "swift-crypto"),
        ]),
        // zstd compression, atomic file writes, checksums, the result file; never imports the model.
        .target(name: "Artifacts", dependencies: ["CZstd", .product(name: "Crypto", package: "swift-crypto")]),
        // `dllava report`: the HTML page of a queue's run (thumbnails with the kept image patches); never imports the model.
        .target(name: "RunReport", dependencies: ["JobQueue", "Artifacts", "BatchDaemon", "Imaging"]),
        // The daemon loop: claim, heartbeat, run through a BatchRunner, write results, complete or fail.
        .target(name: "BatchDaemon", dependencies: [
            "JobQueue", "Artifacts", .product(name: "Logging", package: "swift-log"), .product(name: "CoreMetrics", package: "swift-metrics"),
        ]),
        // What a run reports to operators: Prometheus metrics (a node_exporter textfile, or /metrics over HTTP on
        // loopback) and log lines (plain or JSON); never imports the model.
        .target(name: "Telemetry", dependencies: [
            "Artifacts", .product(name: "Logging", package: "swift-log"), .product(name: "CoreMetrics", package: "swift-metrics"),
            .product(name: "Prometheus", package: "swift-prometheus"), .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"), .product(name: "NIOHTTP1", package: "swift-nio"),
        ]),
        .executableTarget(name: "dllava", dependencies: [
            "DynamicLLaVA", "Numerics", "SafeTensors", "Llama", "Tokenizer", "Imaging", "Sparsification", "JobQueue", "PostgresQueue", "Artifacts", "BatchDaemon", "Telemetry", "CBuildInfo", "RunReport",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),
        // Benchmarks live outside the test targets: speed is never asserted in a test.
        .executableTarget(name: "dllava-bench", dependencies: [
            "CBLAS", "CKernels", "DynamicLLaVA", "Numerics", "Llama", "Vision", "Sparsification", "Artifacts",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),
        .executableTarget(name: "ImagingBenchmark", dependencies: ["Imaging"]),
        .executableTarget(name: "dllava-queue-bench", dependencies: [
            "JobQueue", "PostgresQueue", "Artifacts", .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),

        .executableTarget(name: "dllava-report-bench", dependencies: [
            "JobQueue", "Artifacts", "RunReport", .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),
        // The library's smallest use: caption one image (run by EngineTests on the shipped demo model).
        .executableTarget(name: "dllava-example-caption", dependencies: ["DynamicLLaVA", "Numerics", "SafeTensors"]),

        // libFuzzer harnesses for every parser of untrusted bytes (docs/SECURITY.md, "Fuzzing"): Scripts/fuzz builds
        // this with the fuzzer and address sanitizers in its own scratch folder; the normal build replays inputs.
        .executableTarget(name: "dllava-fuzz", dependencies: [
            "Artifacts", "BatchDaemon", "Imaging", "JobQueue", "SafeTensors", "Tokenizer", .product(name: "Crypto", package: "swift-crypto"),
        ]),

        .testTarget(name: "NumericsTests", dependencies: ["Numerics", "CKernels"]),
        .testTarget(name: "SafeTensorsTests", dependencies: ["SafeTensors", "Numerics"]),
        .testTarget(name: "TokenizerTests", dependencies: ["Tokenizer"], resources: [.copy("Fixtures")]),
        .testTarget(name: "ImagingTests", dependencies: ["Imaging"], resources: [.copy("Fixtures")]),
        // Runs the built `dllava` executable for the command-line tests.
        .target(name: "CommandLineSupport", dependencies: [.product(name: "Crypto", package: "swift-crypto")], path: "Tests/CommandLineSupport"),
        // Real `dllava run` processes on a real queue with the shipped model.
        .testTarget(name: "DaemonTests", dependencies: [
            "dllava", "CommandLineSupport", "Artifacts", "Numerics", .product(name: "GRDB", package: "GRDB.swift"),
        ]),
        // Fixtures are read in place (located from #filePath), not copied into a bundle.
        .testTarget(name: "EngineTests", dependencies: ["CommandLineSupport", "dllava-example-caption", "DynamicLLaVA", "Numerics", "SafeTensors", "Vision", "Llama", "Sparsification",
                                                        "Artifacts"],
                    exclude: ["Fixtures"]),
        .testTarget(name: "JobQueueTests", dependencies: ["JobQueue", "PostgresQueue", "BatchDaemon", "Artifacts", "CommandLineSupport"]),
        // The daemon loop in process, with a fake engine and a manual clock.
        .testTarget(name: "BatchDaemonTests", dependencies: [
            "BatchDaemon", "JobQueue", "Artifacts", .product(name: "MetricsTestKit", package: "swift-metrics"),
        ]),
        .testTarget(name: "TelemetryTests", dependencies: ["Telemetry", "BatchDaemon", .product(name: "Logging", package: "swift-log")]),
        .testTarget(name: "ArtifactsTests", dependencies: ["Artifacts", "CommandLineSupport"]),
        // Runs the built `dllava` executable (found beside the test bundle) on queue databases.
        .testTarget(name: "QueueCommandLineTests", dependencies: [
            "CommandLineSupport", "JobQueue", "Artifacts", .product(name: "GRDB", package: "GRDB.swift"),
        ]),
    ]
)
