// The image-prefix cache: rows asking about one image share the cells of the system text and the
// image, and get bit for bit what each gets alone, prefilled whole.
import Foundation
import Testing
@testable import DynamicLLaVA
import Llama

@Suite("Image-prefix cache")
struct PrefixCacheTests {
    func generator() throws -> Generator {
        var generator = Generator(model: try DynamicFixture.model())
        generator.recordsLogits = true
        return generator
    }

    /// `c`'s image and system text with the question of `other` (or `c`'s own with its first token repeated).
    func question(_ c: GoldenCase, from other: GoldenCase?, mode: SparsityMode, maxTokens: Int) -> GenerationRequest {
        var request = DynamicFixture.request(c, mode: mode, maxTokens: maxTokens)
        request.idsAfterImage = other?.idsAfterImage ?? [c.idsAfterImage[0]] + c.idsAfterImage
        return request
    }

    /// Each request run alone, prefilled whole (no prefix cache): results and the cells of its sequence at the end.
    func alone(_ generator: Generator, _ request: GenerationRequest) throws -> (result: GenerationResult, cells: [SequenceCells]) {
        var batch = GenerationBatch(generator: generator, prefixCacheBytes: 0)
        let row = try batch.add([request])[0]
        while !batch.generating.isEmpty { batch.step() }
        let cells = try #require(batch.snapshot(row)).cells
        return (batch.remove(row), cells)
    }

    func expectSame(_ shared: GenerationResult, _ sharedCells: [SequenceCells]?, as alone: (result: GenerationResult, cells: [SequenceCells]),
                    _ label: String) {
        #expect(shared.tokenIDs == alone.result.tokenIDs, "\(label): tokens")
        #expect(shared.stepLogits == alone.result.stepLogits, "\(label): logits differ from the row prefilled whole")
        #expect(shared.gateLogits == alone.result.gateLogits, "\(label): output gate")
        #expect(shared.keptImageIndices == alone.result.keptImageIndices, "\(label): kept image tokens")
        #expect(shared.stats.imageTokensKept == alone.result.stats.imageTokensKept, "\(label): kept count")
        #expect(shared.stats.kvCellsPerLayer == alone.result.stats.kvCellsPerLayer, "\(label): cells per layer")
        if let sharedCells { #expect(sharedCells == alone.cells, "\(label): K/V cells differ bit for bit") }
    }

    @Test("questions about one image share its prefix, in one add and in later ones, and get bit for bit what each gets alone",
          arguments: [SparsityMode.dynamic, .full])
    func sharedPrefixIsExact(mode: SparsityMode) throws {
        let generator = try generator()
        let cases = try Fixture.cases()
        let requests = [
            question(cases[0], from: nil, mode: mode, maxTokens: 9),
            question(cases[0], from: cases[1], mode: mode, maxTokens: 7),
            question(cases[1], from: nil, mode: mode, maxTokens: 8),
            DynamicFixture.request(cases[0], mode: mode, maxTokens: 10),
            DynamicFixture.request(cases[0], mode: .fastv, maxTokens: 5),
            question(cases[1], from: cases[0], mode: mode, maxTokens: 6),
        ]
        var batch = GenerationBatch(generator: generator)
        let rows = try batch.add(requests)
        while !batch.generating.isEmpty { batch.step() }
        let cells = rows.map { batch.snapshot($0)?.cells }
        let results = rows.map { batch.remove($0) }
        for (r, request) in requests.enumerated() {
            expectSame(results[r], cells[r], as: try alone(generator, request), "row \(r) (\(request.parameters.sparsity.mode))")
        }
        // The first question about each image computed its prefix; the later ones took it, without vision or its prefill.
        let prefixTokens = cases.map { $0.idsBeforeImage.count + generator.model.vision.configuration.patchCount }
        #expect(results.map(\.stats.cachedPrefixTokens) == [nil, prefixTokens[0], nil, prefixTokens[0], nil, prefixTokens[1]])
        #expect(results[1].stats.prefillFlops < results[0].stats.prefillFlops)

        // A later add finds the prefixes still held.
        let later = question(cases[1], from: cases[1], mode: mode, maxTokens: 4)
        let row = try batch.add([later])[0]
        while !batch.generating.isEmpty { batch.step() }
        let laterCells = batch.snapshot(row)?.cells
        let laterResult = batch.remove(row)
        #expect(laterResult.stats.cachedPrefixTokens == prefixTokens[1])
        expectSame(laterResult, laterCells, as: try alone(generator, later), "later add")
    }

    @Test("a row that used a shared prefix resumes from its snapshot exactly")
    func sharedPrefixRowResumes() throws {
        let generator = try generator()
        let cases = try Fixture.cases()
        let requests = [question(cases[0], from: nil, mode: .dynamic, maxTokens: 9), question(cases[0], from: cases[1], mode: .dynamic, maxTokens: 9)]
        let whole = try runToEnd(generator, requests, resuming: [nil, nil])
        #expect(whole[1].stats.cachedPrefixTokens != nil)
        let (snapshots, _) = try interrupt(generator, requests, resuming: [nil, nil], atStep: 3)
        let resumed = try runToEnd(generator, requests, resuming: snapshots)
        for r in requests.indices {
            #expect(resumed[r].tokenIDs == whole[r].tokenIDs, "row \(r)")
            #expect(!resumed[r].stepLogits.isEmpty && resumed[r].stepLogits == whole[r].stepLogits.suffix(resumed[r].stepLogits.count), "row \(r)")
        }
    }

    @Test("no prefix is shared when the cache is off, nor in modes whose kept set reads the question or the job's seed")
    func sharingOnlyWhereExact() throws {
        let generator = try generator()
        let cases = try Fixture.cases()
        for mode in [SparsityMode.fastv, .random] {
            let results = try generator.generate([question(cases[0], from: nil, mode: mode, maxTokens: 3),
                                                  question(cases[0], from: cases[1], mode: mode, maxTokens: 3)])
            #expect(results.allSatisfy { $0.stats.cachedPrefixTokens == nil }, "\(mode)")
        }
        var noCache = question(cases[0], from: cases[1], mode: .dynamic, maxTokens: 3)
        noCache.parameters.sparsity.usesKeyValueCache = false
        #expect(try generator.generate([question(cases[0], from: nil, mode: .dynamic, maxTokens: 3), noCache])[1].stats.cachedPrefixTokens == nil)
        var off = GenerationBatch(generator: generator, prefixCacheBytes: 0)
        let rows = try off.add([question(cases[0], from: nil, mode: .dynamic, maxTokens: 3), question(cases[0], from: cases[1], mode: .dynamic, maxTokens: 3)])
        #expect(rows.map { off.remove($0).stats.cachedPrefixTokens } == [nil, nil])
    }

    @Test("the cache holds at most its bytes, evicting the least recently used prefix")
    func boundedLeastRecentlyUsed() {
        func key(_ n: Int32) -> PrefixCache.Key {
            PrefixCache.Key(idsBeforeImage: [n], pixelBits: [], mode: .dynamic, keptImageCount: 1, precision: .f32)
        }
        func entry(_ bytes: Int) -> PrefixCache.Entry { PrefixCache.Entry(cells: [], tokens: 1, keptImageIndices: nil, byteCount: bytes) }
        var cache = PrefixCache(capacityBytes: 100)
        cache.insert(entry(40), for: key(1))
        cache.insert(entry(40), for: key(2))
        #expect(cache.entry(key(1)) != nil)
        cache.insert(entry(40), for: key(3))
        #expect(cache.entry(key(2)) == nil && cache.entry(key(1)) != nil && cache.entry(key(3)) != nil)
        #expect(cache.byteCount == 80)
        cache.insert(entry(101), for: key(4))
        #expect(cache.entry(key(4)) == nil && cache.byteCount == 80)
    }
}
