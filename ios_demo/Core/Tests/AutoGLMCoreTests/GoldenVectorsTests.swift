import Foundation
import XCTest
@testable import AutoGLMCore

/// The iOS logic against the exporter's host code through golden vectors (GOLDEN_DIR, written by
/// `python scripts/make_golden.py --bundle BUNDLE DIR`). A missing directory fails, never skips.
final class GoldenVectorsTests: XCTestCase {
    static var dir: URL {
        guard let p = ProcessInfo.processInfo.environment["GOLDEN_DIR"] else {
            fatalError("set GOLDEN_DIR to a directory written by scripts/make_golden.py --bundle")
        }
        return URL(fileURLWithPath: p)
    }

    lazy var golden: [String: Any] = {
        let data = try! Data(contentsOf: Self.dir.appendingPathComponent("golden.json"))
        return try! JSONSerialization.jsonObject(with: data) as! [String: Any]
    }()

    lazy var manifest: BundleManifest = try! BundleManifest.load(Self.dir)
    lazy var tokenizer: HubTextEncoder = try! HubTextEncoder(bundle: Self.dir)

    func floats(_ o: Any?) -> [Float] { ((o as! [String: Any])["data"] as! [NSNumber]).map { $0.floatValue } }
    func ints(_ o: Any?) -> [Int] { (o as! [NSNumber]).map { $0.intValue } }

    func assertClose(_ a: [Float], _ b: [Float], _ tol: Float = 1e-5, _ what: String) {
        XCTAssertEqual(a.count, b.count, what)
        for i in 0..<min(a.count, b.count) where abs(a[i] - b[i]) > tol {
            XCTFail("\(what)[\(i)]: \(a[i]) vs \(b[i])")
            return
        }
    }

    func goldenImage() -> (rgb: [UInt8], width: Int, height: Int) {
        let img = golden["image"] as! [String: Any]
        return (ints(img["rgb"]).map { UInt8($0) }, (img["width"] as! NSNumber).intValue, (img["height"] as! NSNumber).intValue)
    }

    func testTokenizerMatchesHuggingFaceTokenizers() {
        for case let c as [String: Any] in golden["tokenizer_cases"] as! [Any] {
            XCTAssertEqual(tokenizer.encodeText(c["text"] as! String), ints(c["ids"]), c["text"] as! String)
        }
    }

    func testPromptIdsAndTypes() throws {
        let p = try ChatPrompt.build(tokenizer, manifest.prompt, text: golden["prompt_text"] as! String,
                                     imageTokens: manifest.image.numTokens, audioTokens: manifest.audioTokens ?? 0)
        XCTAssertEqual(p.ids, ints(golden["prompt_ids"]))
        XCTAssertEqual(p.types, ints(golden["token_types"]))
    }

    func testPixels() {
        let (rgb, w, h) = goldenImage()
        let t = ImagePreprocessor.preprocess(rgb: rgb, width: w, height: h, config: manifest.image)
        assertClose(t.data, floats(golden["pixel_values"]), 1e-5, "pixel_values")
    }

    func testScreenShapedImageGoesToTheHostsBucketWithTheHostsPixels() {
        let img = golden["screen_image"] as! [String: Any]
        let x = ImagePreprocessor.prepare(rgb: ints(img["rgb"]).map { UInt8($0) }, width: (img["width"] as! NSNumber).intValue,
                                          height: (img["height"] as! NSNumber).intValue, config: manifest.image)
        XCTAssertEqual(x.method, img["method"] as? String)
        XCTAssertNotEqual(x.method, BundleManifest.vision)
        XCTAssertEqual([x.grid.0, x.grid.1], ints(img["grid"]))
        assertClose(x.pixels.data, floats(img["pixel_values"]), 1e-5, "screen pixel_values")
    }

    func testLogMel() throws {
        guard let audio = golden["audio"] as? [String: Any], let cfg = manifest.audio else { return XCTAssertNil(manifest.audio) }
        let wave = (audio["waveform"] as! [NSNumber]).map { $0.floatValue }
        assertClose(try LogMel.compute(wave, cfg).data, floats(audio["log_mel"]), 1e-5, "log_mel")
    }

    func testPositions() throws {
        let types = ints(golden["token_types"])
        let pos = try MRopePositions.compute(types: types, imageGrids: [manifest.image.mergedShape])
        let want = (golden["positions"] as! [[NSNumber]]).flatMap { $0.map { $0.int64Value } }
        XCTAssertEqual(pos.positions, want)
        XCTAssertEqual(pos.delta, (golden["rope_delta"] as! NSNumber).int64Value)
    }

    func testReplayedGreedyLoop() throws {
        let trace = golden["trace"] as! [String: Any]
        let runtime = RecordedRuntime(calls: trace["calls"] as! [[String: Any]], maxContext: manifest.maxContext,
                                      prefillChunk: manifest.prefillChunk)
        let prompt = try ChatPrompt.build(tokenizer, manifest.prompt, text: golden["prompt_text"] as! String,
                                          imageTokens: manifest.image.numTokens, audioTokens: manifest.audioTokens ?? 0)
        let (rgb, w, h) = goldenImage()
        let pixels = ImagePreprocessor.preprocess(rgb: rgb, width: w, height: h, config: manifest.image)
        var audios: [FloatTensor] = []
        if let audio = golden["audio"] as? [String: Any], let cfg = manifest.audio {
            audios.append(try LogMel.compute((audio["waveform"] as! [NSNumber]).map { $0.floatValue }, cfg))
        }
        let tokens = try Generator(runtime: runtime, hiddenSize: manifest.hiddenSize).generate(
            prompt, images: [pixels], imageGrids: [manifest.image.mergedShape], audios: audios,
            maxNewTokens: (trace["max_new_tokens"] as! NSNumber).intValue, eosIds: manifest.prompt.eosIds)
        XCTAssertEqual(tokens, ints(trace["tokens"]))
        XCTAssertEqual(runtime.next, runtime.calls.count, "every recorded call was made")
        XCTAssertTrue(runtime.mismatches.isEmpty, runtime.mismatches.joined(separator: "\n"))
    }

    /// Core ML bundles: the app's cos/sin/mask for the stateful decoder equal the host's, call by
    /// call, as recorded from the bundle's packages (`trace.graph_calls`, "text_decoder/<function>").
    func testStatefulDecoderInputs() throws {
        let trace = golden["trace"] as! [String: Any]
        guard (trace["target"] as! String) == "coreml" else { return XCTFail("golden vectors must come from a coreml bundle") }
        let rope = try XCTUnwrap(manifest.rope)
        let calls = (trace["graph_calls"] as! [[String: Any]]).filter { ($0["graph"] as! String).hasPrefix("text_decoder/") }
        XCTAssertGreaterThan(calls.count, 2)
        for c in calls {
            let inputs = c["inputs"] as! [String: Any]
            let t = ((inputs["inputs_embeds"] as! [String: Any])["shape"] as! [NSNumber])[1].intValue
            let start = Int(floats(inputs["cache_start"])[0])
            // the mask must be exact; cos/sin are recomputed from the call's M-RoPE positions
            let mask = StatefulDecoderInputs.additiveMask(start: start, t: t, context: manifest.maxContext)
            XCTAssertEqual(mask, floats(inputs["mask"]), "mask at \(start)")
            let pos = try callPositions(start: start, t: t)
            let cs = StatefulDecoderInputs.cosSin(rope, positions: pos, t: t)
            assertClose(cs.cos, floats(inputs["cos"]), 1e-5, "cos at \(start)")
            assertClose(cs.sin, floats(inputs["sin"]), 1e-5, "sin at \(start)")
        }
    }

    /// [3, T] positions of the decoder call that writes slots start..<start+T: prompt positions from
    /// the golden vectors, then decode positions slot + rope_delta on every axis.
    func callPositions(start: Int, t: Int) throws -> [Int64] {
        let prompt = (golden["positions"] as! [[NSNumber]]).map { $0.map { $0.int64Value } }
        let delta = (golden["rope_delta"] as! NSNumber).int64Value
        var out = [Int64](repeating: 0, count: 3 * t)
        for axis in 0..<3 {
            for i in 0..<t {
                let slot = start + i
                out[axis * t + i] = slot < prompt[axis].count ? prompt[axis][slot] : Int64(slot) + delta
            }
        }
        return out
    }

    func testTamperedBundleIsRefused() throws {
        let tmp = FileManager.default.temporaryDirectory.appendingPathComponent(UUID().uuidString)
        try FileManager.default.copyItem(at: Self.dir, to: tmp)
        defer { try? FileManager.default.removeItem(at: tmp) }
        let tok = tmp.appendingPathComponent("tokenizer.json")
        var bytes = try Data(contentsOf: tok)
        bytes[0] ^= 0xFF
        try bytes.write(to: tok)
        XCTAssertThrowsError(try BundleManifest.load(tmp)) { e in
            XCTAssertTrue("\(e)".contains("sha256"), "\(e)")
        }
    }
}

/// Replays the host runner's calls in order, checking inputs (integers exactly, floats to 1e-5).
final class RecordedRuntime: ModelRuntime {
    let calls: [[String: Any]]
    let maxContext: Int
    let prefillChunk: Int
    var next = 0
    var mismatches: [String] = []

    init(calls: [[String: Any]], maxContext: Int, prefillChunk: Int) {
        self.calls = calls
        self.maxContext = maxContext
        self.prefillChunk = prefillChunk
    }

    func take(_ method: String) -> [String: Any] {
        let c = calls[next]
        if (c["method"] as! String) != method { mismatches.append("call #\(next): \(method) instead of \(c["method"]!)") }
        next += 1
        return c
    }

    func data(_ t: Any?) -> [NSNumber] { (t as! [String: Any])["data"] as! [NSNumber] }

    func check(_ c: [String: Any], _ name: String, _ got: [Float]) {
        let want = data((c["inputs"] as! [String: Any])[name]).map { $0.floatValue }
        if want.count != got.count || zip(want, got).contains(where: { abs($0 - $1) > 1e-5 }) { mismatches.append("\(name) differs") }
    }

    func check(_ c: [String: Any], _ name: String, _ got: [Int64]) {
        if data((c["inputs"] as! [String: Any])[name]).map({ $0.int64Value }) != got { mismatches.append("\(name) differs") }
    }

    func output(_ c: [String: Any]) -> FloatTensor {
        let o = c["output"] as! [String: Any]
        return FloatTensor(shape: (o["shape"] as! [NSNumber]).map { $0.intValue }, data: data(o).map { $0.floatValue })
    }

    func tokenEmbedding(_ inputIds: LongTensor) throws -> FloatTensor {
        let c = take("token_embedding"); check(c, "input_ids", inputIds.data); return output(c)
    }

    func visionEncoder(_ pixelValues: FloatTensor, method: String) throws -> FloatTensor {
        let c = take(method); check(c, "pixel_values", pixelValues.data); return output(c)
    }

    func audioEncoder(_ inputFeatures: FloatTensor) throws -> FloatTensor {
        let c = take("audio_encoder"); check(c, "input_features", inputFeatures.data); return output(c)
    }

    func textDecoder(_ embeds: FloatTensor, _ positionIds: LongTensor, _ cachePosition: LongTensor) throws -> FloatTensor {
        let c = take("text_decoder")
        check(c, "inputs_embeds", embeds.data)
        check(c, "position_ids", positionIds.data)
        check(c, "cache_position", cachePosition.data)
        return output(c)
    }

    func reset() throws { _ = take("reset") }
}
