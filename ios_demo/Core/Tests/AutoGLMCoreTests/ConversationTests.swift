import Foundation
import XCTest
@testable import AutoGLMCore

/// A phone agent's three steps through ChatSession against the exporter's ChatEngine (golden.json's
/// "conversation", make_golden.py --bundle --conversation): each turn's prompt ids, its prefix reuse,
/// its answer under the frequency penalty, and every runtime call must be the host's.
extension GoldenVectorsTests {
    var conversation: [String: Any] {
        guard let c = golden["conversation"] as? [String: Any] else {
            fatalError("golden.json has no conversation: write it with make_golden.py --bundle --conversation")
        }
        return c
    }

    var turns: [[String: Any]] { conversation["turns"] as! [[String: Any]] }

    func screen(_ turn: [String: Any]) -> ImageInput {
        let s = turn["screen"] as! [String: Any]
        return ImagePreprocessor.prepare(rgb: ints(s["rgb"]).map { UInt8($0) }, width: (s["width"] as! NSNumber).intValue,
                                         height: (s["height"] as! NSNumber).intValue, config: manifest.image)
    }

    func agentMessages(upTo i: Int) -> [Message] {
        var m = [Message.text("system", conversation["system"] as! String)]
        for t in turns[0..<i] {
            m.append(.text("user", t["task"] as! String))
            m.append(.text("assistant", t["text"] as! String))
        }
        m.append(Message(role: "user", parts: [.image(screen(turns[i])), .text(turns[i]["task"] as! String)]))
        return m
    }

    func testConversationRendersTheHostsPromptIds() throws {
        for i in turns.indices {
            let r = try Conversation.render(tokenizer, manifest.prompt, agentMessages(upTo: i), audioTokens: manifest.audioTokens)
            XCTAssertEqual(r.prompt.ids, ints(turns[i]["prompt_ids"]), "turn \(i)")
        }
    }

    func testTheBundlesLayoutPiecesAreWhatRendersAConversation() throws {
        let p = manifest.prompt
        XCTAssertTrue(p.layout != nil && p.layoutWritten, "the golden bundle carries its template's layout")
        // other pieces, other tokens: nothing of GLM's layout is left in render itself
        var roles: [String: (before: [Int], after: [Int])] = [:]
        for role in Message.roles { roles[role] = ([10 + role.count], [2]) }
        let other = PromptLayout(prefix: [1], roles: roles,
                                 media: ["image": PromptLayout.MediaPieces(before: [3], placeholder: 4, after: [5])],
                                 generation: ["default": [6], "on": [7], "off": [8, 9]])
        let config = PromptConfig(specialIds: p.specialIds, eosIds: p.eosIds, layout: other, layoutWritten: true)
        let messages = agentMessages(upTo: 0)
        guard case .image(let image) = messages[1].parts[0] else { return XCTFail("turn 0 has a screenshot") }
        let want = [1, 16] + tokenizer.encodeText(conversation["system"] as! String) + [2, 14, 3] +
            Array(repeating: 4, count: image.tokens) + [5] + tokenizer.encodeText(turns[0]["task"] as! String) + [2]
        XCTAssertEqual(try Conversation.render(tokenizer, config, messages, audioTokens: manifest.audioTokens).prompt.ids, want + [6])
        XCTAssertEqual(try Conversation.render(tokenizer, config, messages, audioTokens: manifest.audioTokens,
                                               enableThinking: false).prompt.ids, want + [8, 9])
        // a bundle from before prompt.layout: GLM-4.1V's built-in layout, the template's tokens here
        let before = PromptConfig(specialIds: p.specialIds, eosIds: p.eosIds)
        XCTAssertEqual(try Conversation.render(tokenizer, before, messages, audioTokens: manifest.audioTokens).prompt.ids,
                       ints(turns[0]["prompt_ids"]))
        // a template the exporter could not cut into pieces: refused, with its reason
        let none = PromptConfig(specialIds: p.specialIds, eosIds: p.eosIds, layoutWritten: true,
                                layoutUnavailable: "probe conversation 0 differs")
        XCTAssertThrowsError(try Conversation.render(tokenizer, none, messages, audioTokens: manifest.audioTokens)) { e in
            let text = "\(e)"
            XCTAssertTrue(text.contains("prompt.layout") && text.contains("probe conversation 0 differs"), text)
        }
    }

    func testAgentLoopReusesTheCachedPrefixAndAnswersAsTheHost() throws {
        let calls = turns.flatMap { $0["calls"] as! [[String: Any]] }
        let runtime = RecordedRuntime(calls: calls, maxContext: manifest.maxContext, prefillChunk: manifest.prefillChunk)
        let session = ChatSession(runtime: runtime, manifest: manifest, tokenizer: tokenizer)
        let penalties = Penalties(frequency: (conversation["frequency_penalty"] as! NSNumber).floatValue,
                                  presence: (conversation["presence_penalty"] as! NSNumber).floatValue)
        var before = 0
        for (i, t) in turns.enumerated() {
            let turn = try session.chat(agentMessages(upTo: i), maxTokens: (conversation["max_tokens"] as! NSNumber).intValue,
                                        sampling: Sampling(penalties: penalties))
            XCTAssertEqual(runtime.next - before, (t["calls"] as! [Any]).count, "turn \(i): calls made")
            before = runtime.next
            XCTAssertEqual(turn.reusedTokens, (t["reused_tokens"] as! NSNumber).intValue, "turn \(i): reuse")
            XCTAssertEqual(turn.tokens, ints(t["tokens"]), "turn \(i): answer")
            XCTAssertEqual(turn.text, t["text"] as? String, "turn \(i): answer text")
            XCTAssertEqual(turn.finishReason, t["finish_reason"] as? String, "turn \(i): finish reason")
        }
        XCTAssertEqual(runtime.next, calls.count, "every recorded call was made")
        XCTAssertTrue(runtime.mismatches.isEmpty, runtime.mismatches.joined(separator: "\n"))
    }

    func testPenaltiesLowerRepeatedTokensInFloat32() {
        let logits: [Float] = [1.0, 1.1, 0.95]
        XCTAssertEqual(Sampling(penalties: Penalties(frequency: 0.2)).choose(logits, []), 1)
        XCTAssertEqual(Sampling(penalties: Penalties(frequency: 0.2)).choose(logits, [1]), 0)
        XCTAssertEqual(Sampling(penalties: Penalties(frequency: 0.2, presence: 0.1)).choose(logits, [0, 1]), 2)
        XCTAssertEqual(Sampling(penalties: Penalties(frequency: 0.1)).choose(logits, [1, 1, 0]), 2)
    }
}
