import Foundation

/// The bundle's methods as the app calls them: Core ML in the app, a recorded trace in the tests.
public protocol ModelRuntime {
    var maxContext: Int { get }
    var prefillChunk: Int { get }
    func tokenEmbedding(_ inputIds: LongTensor) throws -> FloatTensor
    /// Through the image bucket's vision `method` (`vision_encoder`, `vision_encoder_<h>x<w>`).
    func visionEncoder(_ pixelValues: FloatTensor, method: String) throws -> FloatTensor
    func audioEncoder(_ inputFeatures: FloatTensor) throws -> FloatTensor
    func textDecoder(_ embeds: FloatTensor, _ positionIds: LongTensor, _ cachePosition: LongTensor) throws -> FloatTensor
    func reset() throws
}

/// The generation loop shared with the exporter's host runner and the Android app: chunked
/// embedding, encoder outputs written over placeholders, chunked prefill, greedy decode.
public struct Generator {
    public let runtime: ModelRuntime
    public let hiddenSize: Int

    public init(runtime: ModelRuntime, hiddenSize: Int) {
        self.runtime = runtime
        self.hiddenSize = hiddenSize
    }

    public static func argmax(_ x: [Float]) -> Int {
        var best = 0
        for i in 1..<x.count where x[i] > x[best] { best = i }
        return best
    }

    public func generate(_ prompt: ChatPrompt, images: [FloatTensor], imageGrids: [(Int, Int)], audios: [FloatTensor],
                         maxNewTokens: Int, eosIds: [Int], imageMethods: [String] = [],
                         onToken: (Int) -> Bool = { _ in true }) throws -> [Int] {
        try run(prompt, images: images, imageGrids: imageGrids, audios: audios, maxNewTokens: maxNewTokens, eosIds: eosIds,
                imageMethods: imageMethods, onToken: onToken).tokens
    }

    /// `generate` with prefix reuse and a token chooser: `reuse` of the prompt's first tokens are
    /// already in the cache (written by the previous call with the same tokens and media) and are
    /// neither embedded, encoded nor prefilled again (0 starts afresh); `choose(logits, answer so far)`
    /// replaces the argmax. `cached`: the cache slots holding the prompt and the tokens fed back.
    public func run(_ prompt: ChatPrompt, images: [FloatTensor], imageGrids: [(Int, Int)], audios: [FloatTensor],
                    maxNewTokens: Int, eosIds: [Int], imageMethods: [String] = [], reuse: Int = 0,
                    choose: (([Float], [Int]) -> Int)? = nil,
                    onToken: (Int) -> Bool = { _ in true }) throws -> (tokens: [Int], cached: Int) {
        let n = prompt.ids.count, h = hiddenSize
        guard n + maxNewTokens <= runtime.maxContext else {
            throw BundleError(file: "prompt", field: nil, expected: "at most \(runtime.maxContext) tokens",
                              got: "\(n + maxNewTokens)", fix: "shorten the prompt or ask for fewer new tokens")
        }
        guard reuse >= 0 && reuse < n else {
            throw BundleError(file: "prompt", field: nil, expected: "reuse in 0..<\(n)", got: "\(reuse)",
                              fix: "at least the prompt's last token must run")
        }
        let positions = try MRopePositions.compute(types: prompt.types, imageGrids: imageGrids)
        if reuse == 0 { try runtime.reset() }
        var embeds = [Float](repeating: 0, count: (n - reuse) * h)  // the prompt's tokens from reuse on
        var a = reuse
        while a < n {
            let b = min(a + runtime.prefillChunk, n)
            let e = try runtime.tokenEmbedding(LongTensor(shape: [1, b - a], data: prompt.ids[a..<b].map { Int64($0) }))
            embeds.replaceSubrange(((a - reuse) * h)..<((b - reuse) * h), with: e.data)
            a = b
        }
        try scatter(&embeds, prompt, ChatPrompt.image, images, imageGrids.map { $0.0 * $0.1 }, reuse) { i, x in
            try runtime.visionEncoder(x, method: i < imageMethods.count ? imageMethods[i] : BundleManifest.vision)
        }
        try scatter(&embeds, prompt, ChatPrompt.audio, audios, nil, reuse) { _, x in try runtime.audioEncoder(x) }
        var logits: FloatTensor?
        a = reuse
        while a < n {
            let b = min(a + runtime.prefillChunk, n), t = b - a
            logits = try runtime.textDecoder(FloatTensor(shape: [1, t, h], data: Array(embeds[((a - reuse) * h)..<((b - reuse) * h)])),
                                             LongTensor(shape: [3, t], data: positions.slice(a, b)),
                                             LongTensor(shape: [t], data: (a..<b).map { Int64($0) }))
            a = b
        }
        var tokens: [Int] = []
        var cacheIndex = n
        for step in 0..<maxNewTokens {
            let token = choose.map { $0(logits!.data, tokens) } ?? Self.argmax(logits!.data)
            tokens.append(token)
            let keepGoing = onToken(token)
            if eosIds.contains(token) || !keepGoing || step == maxNewTokens - 1 { break }
            let e = try runtime.tokenEmbedding(LongTensor(shape: [1, 1], data: [Int64(token)]))
            logits = try runtime.textDecoder(FloatTensor(shape: [1, 1, h], data: e.data),
                                             LongTensor(shape: [3, 1], data: MRopePositions.decode(cacheIndex: cacheIndex, delta: positions.delta)),
                                             LongTensor(shape: [1], data: [Int64(cacheIndex)]))
            cacheIndex += 1
        }
        return (tokens, cacheIndex)
    }

    /// Encode each input and write its rows over its placeholder tokens, `lengths` of them each (equal
    /// shares when nil); `embeds` holds the prompt from `reuse` on: an input wholly before it is not encoded.
    func scatter(_ embeds: inout [Float], _ prompt: ChatPrompt, _ kind: Int, _ inputs: [FloatTensor], _ lengths: [Int]?,
                 _ reuse: Int, _ encode: (Int, FloatTensor) throws -> FloatTensor) throws {
        if inputs.isEmpty { return }
        let slots = prompt.types.indices.filter { prompt.types[$0] == kind }
        let per = lengths ?? Array(repeating: slots.count / inputs.count, count: inputs.count)
        guard per.count == inputs.count && per.reduce(0, +) == slots.count && (lengths != nil || slots.count % inputs.count == 0) else {
            throw BundleError(file: "prompt", field: nil, expected: "\(slots.count) placeholder tokens", got: "inputs of \(per) tokens",
                              fix: "rebuild the prompt")
        }
        var start = 0
        for (i, x) in inputs.enumerated() {
            let own = Array(slots[start..<(start + per[i])])
            start += per[i]
            if let last = own.last, last < reuse { continue }
            let f = try encode(i, x)
            guard f.data.count == per[i] * hiddenSize else {
                throw BundleError(file: "prompt", field: nil, expected: "\(per[i]) encoder rows", got: "\(f.data.count / hiddenSize)",
                                  fix: "rebuild the prompt")
            }
            for (r, slot) in own.enumerated() where slot >= reuse {
                let dst = (slot - reuse) * hiddenSize
                embeds.replaceSubrange(dst..<(dst + hiddenSize), with: f.data[(r * hiddenSize)..<((r + 1) * hiddenSize)])
            }
        }
    }
}
