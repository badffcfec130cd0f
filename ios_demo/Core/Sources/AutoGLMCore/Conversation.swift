import CryptoKit
import Foundation

/// One piece of a message: text, an image ready for its bucket's vision method, or a log-mel clip.
public enum Part {
    case text(String)
    case image(ImageInput)
    case audio(FloatTensor)

    /// What the cache remembers of the part's placeholder tokens: the same pixels give the same key.
    var key: String {
        switch self {
        case .text: return ""
        case .image(let x): return Self.digest(x.pixels)
        case .audio(let x): return Self.digest(x)
        }
    }

    static func digest(_ t: FloatTensor) -> String {
        var bytes = Data()
        for d in t.shape { withUnsafeBytes(of: Int32(d).bigEndian) { bytes.append(contentsOf: $0) } }
        for v in t.data { withUnsafeBytes(of: v.bitPattern.bigEndian) { bytes.append(contentsOf: $0) } }
        return String(SHA256.hash(data: bytes).map { String(format: "%02x", $0) }.joined().prefix(32))
    }
}

public struct Message {
    public static let roles = ["system", "user", "assistant"]
    public let role: String
    public let parts: [Part]

    public init(role: String, parts: [Part]) {
        self.role = role
        self.parts = parts
    }

    public static func text(_ role: String, _ text: String) -> Message { Message(role: role, parts: [.text(text)]) }
}

/// A conversation rendered for the model: the prompt, the key of every token for prefix reuse (its
/// id and the digest of the image or clip it stands for), and the media in order.
public struct RenderedConversation {
    public var prompt = ChatPrompt()
    public var keys: [(Int, String)] = []
    public var images: [ImageInput] = []
    public var audios: [FloatTensor] = []

    mutating func add(_ xs: [Int], _ kind: Int = ChatPrompt.text, key: String = "") {
        prompt.add(xs, kind)
        keys += xs.map { ($0, key) }
    }
}

/// Multi-turn conversations in GLM-4.1V's chat layout (the exporter's host.conversation, the
/// Android core's Conversation): `[gMASK]<sop>`, then per message its role token, a newline and its
/// parts in order, then `<|assistant|>\n`; `enableThinking == false` appends `<think></think>`.
public enum Conversation {
    public static func render(_ tokenizer: TextEncoder, _ prompt: PromptConfig, _ messages: [Message], audioTokens: Int?,
                              enableThinking: Bool? = nil) throws -> RenderedConversation {
        try check(messages)
        var r = RenderedConversation()
        let newline = tokenizer.encodeText("\n")
        r.add([try prompt.special("gmask"), try prompt.special("sop")])
        for m in messages {
            r.add([try prompt.special(m.role)])
            r.add(newline)
            for part in m.parts {
                switch part {
                case .text(let s):
                    r.add(tokenizer.encodeText(s))
                case .image(let x):
                    r.add([try prompt.special("begin_of_image")])
                    r.add(Array(repeating: try prompt.special("image"), count: x.tokens), ChatPrompt.image, key: part.key)
                    r.add([try prompt.special("end_of_image")])
                    r.images.append(x)
                case .audio(let x):
                    guard let n = audioTokens else {
                        throw BundleError(file: "messages", field: "content", expected: "no audio (this bundle has no audio encoder)",
                                          got: "an audio part", fix: "export a checkpoint with an audio tower, or send no audio")
                    }
                    r.add([try prompt.special("begin_of_audio")])
                    r.add(Array(repeating: try prompt.special("audio"), count: n), ChatPrompt.audio, key: part.key)
                    r.add([try prompt.special("end_of_audio")])
                    r.audios.append(x)
                }
            }
        }
        r.add([try prompt.special("assistant")])
        r.add(newline)
        if enableThinking == false { r.add(tokenizer.encodeText("<think></think>")) }
        return r
    }

    static func check(_ messages: [Message]) throws {
        guard let last = messages.last, last.role != "assistant" else {
            throw BundleError(file: "messages", field: nil, expected: "a conversation ending with the user's turn",
                              got: messages.isEmpty ? "no message" : "the assistant's turn last", fix: "end with a user message")
        }
        for (i, m) in messages.enumerated() {
            guard Message.roles.contains(m.role) else {
                throw BundleError(file: "messages", field: "[\(i)].role", expected: "system, user or assistant",
                                  got: String(m.role.prefix(40)), fix: "use system, user or assistant")
            }
            let mediaOnlyForUser = m.role == "user" || m.parts.allSatisfy { if case .text = $0 { return true } else { return false } }
            guard mediaOnlyForUser else {
                throw BundleError(file: "messages", field: "[\(i)].content", expected: "text only", got: "an image or audio part",
                                  fix: "move the image or audio into a user message")
            }
        }
    }
}

/// OpenAI's additive penalties over the answer so far, then the largest logit (the agent's
/// `temperature=0, frequency_penalty=0.2`), in float32 as the host computes them.
public struct Penalties {
    public let frequency: Float
    public let presence: Float

    public init(frequency: Float = 0, presence: Float = 0) {
        self.frequency = frequency
        self.presence = presence
    }

    public func choose(_ logits: [Float], _ answer: [Int]) -> Int {
        if answer.isEmpty || (frequency == 0 && presence == 0) { return Generator.argmax(logits) }
        var x = logits
        var counts: [Int: Int] = [:]
        for t in answer { counts[t, default: 0] += 1 }
        for (t, c) in counts { x[t] = x[t] - (Float(c) * frequency + presence) }
        return Generator.argmax(x)
    }
}

/// One answer: its tokens (without the end-of-turn token), why it ended, and the prompt's reuse.
public struct ChatTurn {
    public let tokens: [Int]
    public let finishReason: String
    public let promptTokens: Int
    public let reusedTokens: Int
}

/// A conversation on one runtime, remembering what its KV cache holds (the exporter's ChatEngine):
/// a turn whose prompt starts with tokens already in the cache, images included, prefills only the rest.
public final class ChatSession {
    let runtime: ModelRuntime
    let manifest: BundleManifest
    let tokenizer: TextEncoder
    var cached: [(Int, String)] = []

    public init(runtime: ModelRuntime, manifest: BundleManifest, tokenizer: TextEncoder) {
        self.runtime = runtime
        self.manifest = manifest
        self.tokenizer = tokenizer
    }

    public func chat(_ messages: [Message], maxTokens: Int, penalties: Penalties = Penalties(), enableThinking: Bool? = nil,
                     onToken: (Int) -> Bool = { _ in true }) throws -> ChatTurn {
        let r = try Conversation.render(tokenizer, manifest.prompt, messages, audioTokens: manifest.audioTokens,
                                        enableThinking: enableThinking)
        let n = r.prompt.ids.count
        guard n < runtime.maxContext, maxTokens >= 1 else {
            throw BundleError(file: "messages", field: nil, expected: "fewer than \(runtime.maxContext) prompt tokens and maxTokens >= 1",
                              got: "\(n) tokens, maxTokens \(maxTokens)", fix: "drop earlier turns or images")
        }
        var reuse = 0
        let limit = min(cached.count, n - 1)  // the prompt's last token always runs: its logits start the answer
        while reuse < limit && cached[reuse] == r.keys[reuse] { reuse += 1 }
        cached = []  // until this turn completes the cache holds an unknown mix
        let eos = manifest.prompt.eosIds
        let out = try Generator(runtime: runtime, hiddenSize: manifest.hiddenSize).run(
            r.prompt, images: r.images.map { $0.pixels }, imageGrids: r.images.map { $0.grid }, audios: r.audios,
            maxNewTokens: min(maxTokens, runtime.maxContext - n), eosIds: eos, imageMethods: r.images.map { $0.method },
            reuse: reuse, choose: { penalties.choose($0, $1) }, onToken: onToken)
        cached = r.keys + out.tokens[0..<(out.cached - n)].map { ($0, "") }
        let stopped = out.tokens.last.map { eos.contains($0) } ?? false
        return ChatTurn(tokens: stopped ? Array(out.tokens.dropLast()) : out.tokens, finishReason: stopped ? "stop" : "length",
                        promptTokens: n, reusedTokens: reuse)
    }
}
