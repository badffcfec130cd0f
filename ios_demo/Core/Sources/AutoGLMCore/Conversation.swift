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

/// Multi-turn conversations rendered for the model (the exporter's host.conversation, the Android
/// core's Conversation): the bundle's chat layout (`prompt.layout`: the checkpoint's template as token
/// pieces, checked against it at export) fills in the role, image, audio and generation tokens around
/// the messages' parts. For GLM-4.1V: `[gMASK]<sop>`, per message its role token, a newline and its
/// parts in order, then `<|assistant|>\n`.
public enum Conversation {
    public static func render(_ tokenizer: TextEncoder, _ prompt: PromptConfig, _ messages: [Message], audioTokens: Int?,
                              enableThinking: Bool? = nil) throws -> RenderedConversation {
        try check(messages)
        let layout = try prompt.chatLayout(tokenizer)
        var r = RenderedConversation()
        r.add(layout.prefix)
        for m in messages {
            guard let role = layout.roles[m.role] else {
                throw BundleError(file: "messages", field: "role", expected: "system, user or assistant", got: String(m.role.prefix(40)),
                                  fix: "use system, user or assistant")
            }
            r.add(role.before)
            for part in m.parts {
                switch part {
                case .text(let s):
                    r.add(tokenizer.encodeText(s))
                case .image(let x):
                    let p = try pieces(layout, "image")
                    r.add(p.before)
                    r.add(Array(repeating: p.placeholder, count: x.tokens), ChatPrompt.image, key: part.key)
                    r.add(p.after)
                    r.images.append(x)
                case .audio(let x):
                    guard let n = audioTokens else {
                        throw BundleError(file: "messages", field: "content", expected: "no audio (this bundle has no audio encoder)",
                                          got: "an audio part", fix: "export a checkpoint with an audio tower, or send no audio")
                    }
                    let p = try pieces(layout, "audio")
                    r.add(p.before)
                    r.add(Array(repeating: p.placeholder, count: n), ChatPrompt.audio, key: part.key)
                    r.add(p.after)
                    r.audios.append(x)
                }
            }
            r.add(role.after)
        }
        r.add(layout.generation(enableThinking))
        return r
    }

    static func pieces(_ layout: PromptLayout, _ kind: String) throws -> PromptLayout.MediaPieces {
        guard let p = layout.media[kind] else {
            throw BundleError(file: "messages", field: "content", expected: "no \(kind) (this bundle's chat layout has no place for it)",
                              got: "an \(kind) part", fix: "send no \(kind)")
        }
        return p
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

/// OpenAI's additive penalties over the answer so far (the agent asks for `temperature=0,
/// frequency_penalty=0.2`; `Sampling` applies them first), in float32 as the host computes them.
public struct Penalties {
    public let frequency: Float
    public let presence: Float

    public init(frequency: Float = 0, presence: Float = 0) {
        self.frequency = frequency
        self.presence = presence
    }

    /// `logits` with the penalties subtracted.
    public func apply(_ logits: [Float], _ answer: [Int]) -> [Float] {
        if answer.isEmpty || (frequency == 0 && presence == 0) { return logits }
        var x = logits
        var counts: [Int: Int] = [:]
        for t in answer { counts[t, default: 0] += 1 }
        for (t, c) in counts { x[t] = x[t] - (Float(c) * frequency + presence) }
        return x
    }

}

/// One answer: its tokens (without the end-of-turn token), its text (cut before a stop string that
/// ended it), why it ended (`stop`: end-of-turn token or stop string, `length`: maxTokens or the
/// context, `cancelled`: onToken stopped it), and the prompt's reuse.
public struct ChatTurn {
    public let tokens: [Int]
    public let text: String
    public let finishReason: String
    public let promptTokens: Int
    public let reusedTokens: Int

    /// GLM's `<think>R</think>A` split into (R, A); no think block: ("", text).
    public var reasoningAndAnswer: (String, String) { Reasoning.split(text) }
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

    /// Answer `messages`. `stop`: strings that end the answer (cut before them, as OpenAI's `stop`);
    /// `onText` receives the answer's text as it grows, never a piece a stop string or a half
    /// multi-byte character may still take back; `onToken` sees every token and may stop early.
    public func chat(_ messages: [Message], maxTokens: Int, sampling: Sampling = Sampling(), enableThinking: Bool? = nil,
                     stop: [String] = [], onText: ((String) -> Void)? = nil,
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
        let text = AnswerText(tokenizer: tokenizer, stops: stop.filter { !$0.isEmpty }, onText: onText)
        var cancelled = false
        let out = try Generator(runtime: runtime, hiddenSize: manifest.hiddenSize).run(
            r.prompt, images: r.images.map { $0.pixels }, imageGrids: r.images.map { $0.grid }, audios: r.audios,
            maxNewTokens: min(maxTokens, runtime.maxContext - n), eosIds: eos, imageMethods: r.images.map { $0.method },
            reuse: reuse, choose: { sampling.choose($0, $1) }, onToken: { token in
                let keepGoing = onToken(token)
                cancelled = !keepGoing
                if eos.contains(token) { return keepGoing }
                return text.add(token) && keepGoing
            })
        cached = r.keys + out.tokens[0..<(out.cached - n)].map { ($0, "") }
        let ended = out.tokens.last.map { eos.contains($0) } ?? false
        let reason = ended || text.stopped ? "stop" : (cancelled ? "cancelled" : "length")
        return ChatTurn(tokens: ended ? Array(out.tokens.dropLast()) : out.tokens, text: text.finish(), finishReason: reason,
                        promptTokens: n, reusedTokens: reuse)
    }
}

/// The text of a growing answer (the host's Detokenizer): the tokens since the last whole character
/// are decoded together, so a multi-byte character split over tokens comes out whole without
/// decoding the whole answer again per token; a stop string cuts the text where it begins and ends
/// the answer.
final class AnswerText {
    let tokenizer: TextEncoder
    let stops: [String]
    let onText: ((String) -> Void)?
    var window: [Int] = []  // the tokens after the committed text
    var committed = ""
    var text = ""
    var shown = ""
    private(set) var stopped = false

    init(tokenizer: TextEncoder, stops: [String], onText: ((String) -> Void)?) {
        self.tokenizer = tokenizer
        self.stops = stops
        self.onText = onText
    }

    /// Adds `token`; false once a stop string has appeared.
    func add(_ token: Int) -> Bool {
        window.append(token)
        let tail = tokenizer.decode(window)
        let seen = text.count
        var t = committed + tail
        if !tail.hasSuffix("\u{FFFD}") {  // ends on a whole character: later tokens decode on their own
            committed = t
            window = []
        }
        for s in stops {  // only where the new text can complete a stop string
            let from = t.index(t.startIndex, offsetBy: max(0, min(seen - s.count + 1, t.count)))
            if let at = t.range(of: s, range: from..<t.endIndex) {
                t = String(t[..<at.lowerBound])
                stopped = true
            }
        }
        text = t
        var open = t
        while open.hasSuffix("\u{FFFD}") { open.removeLast() }
        show(stopped ? t : Self.holdBack(open, stops))
        return !stopped
    }

    /// The final text; a character the answer ended inside stays U+FFFD, as a full decode shows it.
    func finish() -> String {
        show(text)
        return text
    }

    private func show(_ ready: String) {
        if let onText = onText, ready.count > shown.count, ready.hasPrefix(shown) {
            onText(String(ready.dropFirst(shown.count)))
            shown = ready
        }
    }

    /// `text` without a tail that could still grow into one of `stops`.
    static func holdBack(_ text: String, _ stops: [String]) -> String {
        var cut = 0
        for s in stops {
            var k = min(s.count - 1, text.count)
            while k >= 1 {
                if text.hasSuffix(String(s.prefix(k))) {
                    cut = max(cut, k)
                    break
                }
                k -= 1
            }
        }
        return String(text.dropLast(cut))
    }
}

/// GLM's reasoning block (the exporter's host/conversation.split_reasoning).
public enum Reasoning {
    public static let open = "<think>"
    public static let close = "</think>"

    /// (reasoning, answer) of `<think>R</think>A`; no think block: ("", text); unclosed: (R, "").
    public static func split(_ text: String) -> (String, String) {
        let stripped = text.drop { $0.isWhitespace }
        guard stripped.hasPrefix(open) else { return ("", text) }
        let body = stripped.dropFirst(open.count)
        guard let end = body.range(of: close) else { return (String(body), "") }
        return (String(body[..<end.lowerBound]), String(body[end.upperBound...]))
    }
}
