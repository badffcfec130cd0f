import Foundation

/// Turns text into token ids. The app uses swift-transformers' `Tokenizer` (see `HubTextEncoder`).
public protocol TextEncoder {
    func encodeText(_ text: String) -> [Int]
    /// Token ids back to text, special tokens skipped.
    func decode(_ ids: [Int]) -> String
}

/// One user turn: `[gMASK]<sop><|user|>\n` + image / audio / text parts in order + `<|assistant|>\n`,
/// with each token's modality (positions and the embedding scatter depend on it).
public struct ChatPrompt {
    public static let text = 0
    public static let image = 1
    public static let audio = 3
    public static let defaultOrder = ["image", "audio", "text"]

    public var ids: [Int] = []
    public var types: [Int] = []

    mutating func add(_ xs: [Int], _ kind: Int) {
        ids += xs
        types += Array(repeating: kind, count: xs.count)
    }

    /// GLM-4.1V's built-in layout (`PromptLayout.builtin`) around one user message.
    public static func build(_ tokenizer: TextEncoder, _ prompt: PromptConfig, text: String, imageTokens: Int,
                             audioTokens: Int, order: [String] = defaultOrder) throws -> ChatPrompt {
        let layout = try PromptLayout.builtin(tokenizer, prompt)
        let user = layout.roles["user"]!
        var p = ChatPrompt()
        p.add(layout.prefix + user.before, Self.text)
        for part in order {
            let n = part == "image" ? imageTokens : (part == "audio" ? audioTokens : 0)
            if part == "text" {
                p.add(tokenizer.encodeText(text), Self.text)
            } else if n > 0 {
                guard let pieces = layout.media[part] else {
                    throw BundleError(file: BundleManifest.fileName, field: "prompt.special_ids.\(part)",
                                      expected: "the id of the chat token '\(part)'", got: "nothing", fix: JsonNode.reexport)
                }
                p.add(pieces.before, Self.text)
                p.add(Array(repeating: pieces.placeholder, count: n), part == "image" ? Self.image : Self.audio)
                p.add(pieces.after, Self.text)
            }
        }
        p.add(user.after + layout.generation(nil), Self.text)
        return p
    }
}

/// 3-axis M-RoPE positions (transformers' `Glm4vModel.get_rope_index`); decode positions are
/// cache_index + delta on all three axes.
public struct MRopePositions {
    public let positions: [Int64]  // axis-major [3, length]
    public let length: Int
    public let delta: Int64

    public func slice(_ from: Int, _ to: Int) -> [Int64] {
        (0..<3).flatMap { axis in positions[(axis * length + from)..<(axis * length + to)] }
    }

    public static func compute(types: [Int], imageGrids: [(Int, Int)]) throws -> MRopePositions {
        let n = types.count
        var pos = [Int64](repeating: 0, count: 3 * n)
        var cur: Int64 = 0
        var i = 0
        var image = 0
        while i < n {
            let kind = types[i]
            var j = i
            while j < n && types[j] == kind { j += 1 }
            let run = j - i
            if kind == ChatPrompt.image {
                let (gh, gw) = imageGrids[image]
                image += 1
                guard gh * gw == run else { throw BundleError(file: "prompt", field: nil, expected: "\(gh * gw) image tokens", got: "\(run)", fix: "rebuild the prompt") }
                for k in 0..<run {
                    pos[i + k] = cur
                    pos[n + i + k] = cur + Int64(k / gw)
                    pos[2 * n + i + k] = cur + Int64(k % gw)
                }
                cur += Int64(max(gh, gw))
            } else {
                for k in 0..<run {
                    for axis in 0..<3 { pos[axis * n + i + k] = cur + Int64(k) }
                }
                cur += Int64(run)
            }
            i = j
        }
        let delta = n == 0 ? 0 : (pos.max() ?? 0) + 1 - Int64(n)
        return MRopePositions(positions: pos, length: n, delta: delta)
    }

    public static func decode(cacheIndex: Int, delta: Int64) -> [Int64] {
        let p = Int64(cacheIndex) + delta
        return [p, p, p]
    }
}
