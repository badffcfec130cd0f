package ai.autoglm.demo.core

import com.google.gson.JsonObject
import org.junit.Assert.assertArrayEquals
import org.junit.Assert.assertEquals
import org.junit.Assert.assertThrows
import org.junit.Assert.assertTrue
import org.junit.Test

/**
 * A phone agent's three steps through ChatSession against the exporter's ChatEngine (golden.json's
 * "conversation", make_golden.py --conversation): a system prompt, then per step a new portrait
 * screenshot and the task, earlier screenshots dropped and earlier answers kept. Each turn's prompt
 * ids, its prefix reuse, its answer under the agent's frequency penalty, and every runtime call
 * (only the new tokens prefilled, no reset after the first turn) must be the host's.
 */
class ConversationReplayTest {
    private val g: JsonObject = Golden.json.getAsJsonObject("conversation")
        ?: throw IllegalStateException("golden.json has no conversation: write it with make_golden.py --bundle --conversation")
    private val turns = g.getAsJsonArray("turns").map { it.asJsonObject }

    private fun screen(t: JsonObject): ImageInput {
        val s = t.getAsJsonObject("screen")
        return ImagePreprocessor.prepare(Golden.ints(s, "rgb"), s.get("width").asInt, s.get("height").asInt, Golden.manifest.image)
    }

    private fun conversation(upTo: Int): List<Message> {
        val messages = arrayListOf(Message.text("system", g.get("system").asString))
        for (i in 0 until upTo) {
            messages.add(Message.text("user", turns[i].get("task").asString))
            messages.add(Message.text("assistant", turns[i].get("text").asString))
        }
        messages.add(Message("user", listOf(Part.image(screen(turns[upTo])), Part.text(turns[upTo].get("task").asString))))
        return messages
    }

    @Test
    fun everyTurnRendersTheHostsPromptIds() {
        for (i in turns.indices) {
            val r = Conversation.render(Golden.tokenizer, Golden.manifest.prompt, conversation(i), Golden.manifest.audioTokens)
            assertArrayEquals("turn $i prompt ids", Golden.ints(turns[i], "prompt_ids"), r.prompt.ids)
        }
    }

    @Test
    fun theBundlesLayoutPiecesAreWhatRendersAConversation() {
        val p = Golden.manifest.prompt
        assertTrue("the golden bundle carries its template's layout", p.layout != null && p.layoutWritten)
        // other pieces, other tokens: nothing of GLM's layout is left in render itself
        val other = PromptLayout(intArrayOf(1), Message.ROLES.associateWith { Pair(intArrayOf(10 + it.length), intArrayOf(2)) },
            mapOf(Part.IMAGE to PromptLayout.MediaPieces(intArrayOf(3), 4, intArrayOf(5))),
            mapOf("default" to intArrayOf(6), "on" to intArrayOf(7), "off" to intArrayOf(8, 9)))
        val config = PromptConfig(p.specialIds, p.eosIds, p.bosId, other, true, null)
        val messages = conversation(0)
        val image = (messages[1].parts[0].image ?: throw AssertionError("turn 0 has a screenshot")).tokens
        val tok = Golden.tokenizer
        val want = intArrayOf(1, 16) + tok.encode(g.get("system").asString) + intArrayOf(2, 14, 3) + IntArray(image) { 4 } +
            intArrayOf(5) + tok.encode(turns[0].get("task").asString) + intArrayOf(2)
        val audio = Golden.manifest.audioTokens
        assertArrayEquals(want + intArrayOf(6), Conversation.render(tok, config, messages, audio).prompt.ids)
        assertArrayEquals(want + intArrayOf(8, 9), Conversation.render(tok, config, messages, audio, false).prompt.ids)
        // a bundle from before prompt.layout: GLM-4.1V's built-in layout, the template's tokens here
        val before = PromptConfig(p.specialIds, p.eosIds, p.bosId)
        assertArrayEquals(Golden.ints(turns[0], "prompt_ids"), Conversation.render(tok, before, messages, audio).prompt.ids)
        // a template the exporter could not cut into pieces: refused, with its reason
        val none = PromptConfig(p.specialIds, p.eosIds, p.bosId, null, true, "probe conversation 0 differs")
        val e = assertThrows(BundleError::class.java) { Conversation.render(tok, none, messages, audio) }
        assertTrue(e.message!!, e.message!!.contains("prompt.layout") && e.message!!.contains("probe conversation 0 differs"))
    }

    @Test
    fun agentLoopReusesTheCachedPrefixAndAnswersAsTheHost() {
        val m = Golden.manifest
        val calls = turns.flatMap { t -> t.getAsJsonArray("calls").map { it.asJsonObject } }
        val runtime = RecordedRuntime(calls, m.maxContext, m.prefillChunk)
        val session = ChatSession(runtime, m, Golden.tokenizer)
        val penalties = Penalties(g.get("frequency_penalty").asFloat, g.get("presence_penalty").asFloat)
        var before = 0
        for ((i, t) in turns.withIndex()) {
            val turn = session.chat(conversation(i), g.get("max_tokens").asInt, Sampling(penalties = penalties))
            val made = calls.size - runtime.remaining - before
            before += made
            assertEquals("turn $i: calls made", t.getAsJsonArray("calls").size(), made)
            assertEquals("turn $i: prompt tokens", Golden.ints(t, "prompt_ids").size, turn.promptTokens)
            assertEquals("turn $i: tokens already in the cache", t.get("reused_tokens").asInt, turn.reusedTokens)
            assertArrayEquals("turn $i: answer", Golden.ints(t, "tokens"), turn.tokens)
            assertEquals("turn $i: answer text", t.get("text").asString, turn.text)
            assertEquals("turn $i: finish reason", t.get("finish_reason").asString, turn.finishReason)
            if (i > 0) assertTrue("turn $i reuses the system prompt at least", turn.reusedTokens > 3)
        }
        assertEquals("every recorded call was made", 0, runtime.remaining)
    }

    @Test
    fun penaltiesLowerRepeatedTokensInFloat32() {
        val logits = floatArrayOf(1.0f, 1.1f, 0.95f)
        assertEquals(1, Sampling(penalties = Penalties(0.2f)).choose(logits, emptyList()))
        assertEquals(0, Sampling(penalties = Penalties(0.2f)).choose(logits, listOf(1)))  // 1.1 - 0.2 < 1.0
        assertEquals(2, Sampling(penalties = Penalties(0.2f, 0.1f)).choose(logits, listOf(0, 1)))  // 0.7, 0.8 < 0.95
        assertEquals(2, Sampling(penalties = Penalties(0.1f)).choose(logits, listOf(1, 1, 0)))  // 0.9, 0.9 < 0.95
    }
}
