import Foundation

/// The checkpoint's chat template as token pieces (manifest `prompt.layout`; the exporter's
/// host.prompt_layout, the Android core's PromptLayout): the app has no template engine, so the
/// exporter cuts the template into these pieces and checks they give the template's tokens. A
/// conversation is `prefix`, then per message its role's `before`, its parts (text encoded on its own;
/// an image or clip as its kind's `before`, one `placeholder` per token, `after`) and its role's
/// `after`, then the generation prompt for the thinking switch.
public struct PromptLayout {
    public struct MediaPieces {
        public let before: [Int]
        public let placeholder: Int
        public let after: [Int]
    }

    public let prefix: [Int]
    public let roles: [String: (before: [Int], after: [Int])]
    public let media: [String: MediaPieces]
    let generation: [String: [Int]]  // "default", "on", "off"

    public init(prefix: [Int], roles: [String: (before: [Int], after: [Int])], media: [String: MediaPieces],
                generation: [String: [Int]]) {
        self.prefix = prefix
        self.roles = roles
        self.media = media
        self.generation = generation
    }

    /// The generation prompt: `default` when the request says nothing about thinking.
    public func generation(_ enableThinking: Bool?) -> [Int] {
        generation[enableThinking == nil ? "default" : (enableThinking! ? "on" : "off")] ?? []
    }

    static func parse(_ node: JsonNode) throws -> PromptLayout {
        let rolesNode = try node.reqObj("roles")
        var roles: [String: (before: [Int], after: [Int])] = [:]
        for role in Message.roles where rolesNode.obj[role] != nil {  // <|system|> is optional
            let r = try rolesNode.child(role, try rolesNode.req(role))
            roles[role] = (try r.reqInts("before"), try r.reqInts("after"))
        }
        let mediaNode = try node.reqObj("media")
        var media: [String: MediaPieces] = [:]
        for kind in ["image", "audio"] {
            guard let m = mediaNode.opt(kind) else { continue }
            let n = try mediaNode.child(kind, m)
            media[kind] = MediaPieces(before: try n.reqInts("before"), placeholder: try n.reqInt("placeholder"),
                                      after: try n.reqInts("after"))
        }
        let g = try node.reqObj("generation")
        return PromptLayout(prefix: try node.reqInts("prefix"), roles: roles, media: media,
                            generation: ["default": try g.reqInts("default"), "on": try g.reqInts("on"), "off": try g.reqInts("off")])
    }

    /// GLM-4.1V's layout, for bundles written before `prompt.layout` existed.
    static func builtin(_ tokenizer: TextEncoder, _ prompt: PromptConfig) throws -> PromptLayout {
        let newline = tokenizer.encodeText("\n")
        var roles: [String: (before: [Int], after: [Int])] = [:]
        for role in Message.roles where prompt.specialIds[role] != nil { roles[role] = ([try prompt.special(role)] + newline, []) }
        var media = ["image": MediaPieces(before: [try prompt.special("begin_of_image")], placeholder: try prompt.special("image"),
                                          after: [try prompt.special("end_of_image")])]
        if prompt.specialIds["audio"] != nil {
            media["audio"] = MediaPieces(before: [try prompt.special("begin_of_audio")], placeholder: try prompt.special("audio"),
                                         after: [try prompt.special("end_of_audio")])
        }
        let generation = [try prompt.special("assistant")] + newline
        return PromptLayout(prefix: [try prompt.special("gmask"), try prompt.special("sop")], roles: roles, media: media,
                            generation: ["default": generation, "on": generation,
                                         "off": generation + tokenizer.encodeText("<think></think>")])
    }
}
