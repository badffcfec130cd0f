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
        let n = prompt.ids.count, h = hiddenSize
        guard n + maxNewTokens <= runtime.maxContext else {
            throw BundleError(file: "prompt", field: nil, expected: "at most \(runtime.maxContext) tokens",
                              got: "\(n + maxNewTokens)", fix: "shorten the prompt or ask for fewer new tokens")
        }
        let positions = try MRopePositions.compute(types: prompt.types, imageGrids: imageGrids)
        try runtime.reset()
        var embeds = [Float](repeating: 0, count: n * h)
        var a = 0
        while a < n {
            let b = min(a + runtime.prefillChunk, n)
            let e = try runtime.tokenEmbedding(LongTensor(shape: [1, b - a], data: prompt.ids[a..<b].map { Int64($0) }))
            embeds.replaceSubrange((a * h)..<(b * h), with: e.data)
            a = b
        }
        try scatter(&embeds, prompt, ChatPrompt.image, images) { i, x in
            try runtime.visionEncoder(x, method: i < imageMethods.count ? imageMethods[i] : BundleManifest.vision)
        }
        try scatter(&embeds, prompt, ChatPrompt.audio, audios) { _, x in try runtime.audioEncoder(x) }
        var logits: FloatTensor?
        a = 0
        while a < n {
            let b = min(a + runtime.prefillChunk, n), t = b - a
            logits = try runtime.textDecoder(FloatTensor(shape: [1, t, h], data: Array(embeds[(a * h)..<(b * h)])),
                                             LongTensor(shape: [3, t], data: positions.slice(a, b)),
                                             LongTensor(shape: [t], data: (a..<b).map { Int64($0) }))
            a = b
        }
        var tokens: [Int] = []
        var cacheIndex = n
        for step in 0..<maxNewTokens {
            let token = Self.argmax(logits!.data)
            tokens.append(token)
            let keepGoing = onToken(token)
            if eosIds.contains(token) || !keepGoing || step == maxNewTokens - 1 { break }
            let e = try runtime.tokenEmbedding(LongTensor(shape: [1, 1], data: [Int64(token)]))
            logits = try runtime.textDecoder(FloatTensor(shape: [1, 1, h], data: e.data),
                                             LongTensor(shape: [3, 1], data: MRopePositions.decode(cacheIndex: cacheIndex, delta: positions.delta)),
                                             LongTensor(shape: [1], data: [Int64(cacheIndex)]))
            cacheIndex += 1
        }
        return tokens
    }

    func scatter(_ embeds: inout [Float], _ prompt: ChatPrompt, _ kind: Int, _ inputs: [FloatTensor],
                 _ encode: (Int, FloatTensor) throws -> FloatTensor) throws {
        if inputs.isEmpty { return }
        let slots = prompt.types.indices.filter { prompt.types[$0] == kind }
        var row = 0
        for (i, x) in inputs.enumerated() {
            let f = try encode(i, x)
            let rows = f.data.count / hiddenSize
            for r in 0..<rows {
                let dst = slots[row + r] * hiddenSize
                embeds.replaceSubrange(dst..<(dst + hiddenSize), with: f.data[(r * hiddenSize)..<((r + 1) * hiddenSize)])
            }
            row += rows
        }
        guard row == slots.count else {
            throw BundleError(file: "prompt", field: nil, expected: "\(slots.count) encoder rows", got: "\(row)", fix: "rebuild the prompt")
        }
    }
}
