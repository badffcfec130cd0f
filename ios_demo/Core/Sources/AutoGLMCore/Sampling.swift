import Foundation

/// The next token from logits, with OpenAI's and Hugging Face's knobs (the exporter's
/// host/sampling.py): `penalties` first, then greedy when `temperature` is 0 or `topK` is 1;
/// otherwise temperature, top-k, top-p (the smallest head of the sorted distribution whose mass
/// reaches `topP`; the first token always stays), softmax and one draw. A `seed` makes the draws
/// repeatable. The draws are not the host's (torch's generator is not ported): sampled answers
/// match the host in distribution, greedy ones token for token.
public final class Sampling {
    public let temperature: Float
    public let topP: Float
    public let topK: Int
    public let penalties: Penalties
    private var random: SplitMix64

    public init(temperature: Float = 0, topP: Float = 1, topK: Int = 0, penalties: Penalties = Penalties(), seed: UInt64? = nil) {
        precondition(temperature >= 0 && temperature.isFinite, "temperature must be 0 or more")
        precondition(topP > 0 && topP <= 1, "topP must lie in (0, 1]")
        precondition(topK >= 0, "topK must be 0 (no cut) or more")
        self.temperature = temperature
        self.topP = topP
        self.topK = topK
        self.penalties = penalties
        self.random = SplitMix64(seed: seed ?? UInt64.random(in: 0...UInt64.max))
    }

    public var greedy: Bool { temperature == 0 || topK == 1 }

    public func choose(_ logits: [Float], _ answer: [Int]) -> Int {
        let x = penalties.apply(logits, answer)
        if greedy { return Generator.argmax(x) }
        let order = x.indices.sorted { x[$0] > x[$1] || (x[$0] == x[$1] && $0 < $1) }
        var keep = topK >= 1 && topK < order.count ? topK : order.count
        let top = x[order[0]] / temperature
        let p = (0..<keep).map { exp(Double(x[order[$0]] / temperature - top)) }
        var sum = p.reduce(0, +)
        if topP < 1 {
            var mass = 0.0
            for i in 0..<keep {
                if mass / sum >= Double(topP) {
                    keep = i
                    break
                }
                mass += p[i]
            }
            sum = p[0..<keep].reduce(0, +)
        }
        var u = Double.random(in: 0..<1, using: &random) * sum
        for i in 0..<keep {
            u -= p[i]
            if u < 0 { return order[i] }
        }
        return order[keep - 1]
    }
}

/// A seedable generator (SplitMix64): Swift's own generator cannot be seeded.
struct SplitMix64: RandomNumberGenerator {
    private var state: UInt64

    init(seed: UInt64) { state = seed }

    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
