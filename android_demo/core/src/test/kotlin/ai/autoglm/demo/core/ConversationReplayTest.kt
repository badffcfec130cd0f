package ai.autoglm.demo.core

import com.google.gson.JsonObject
import org.junit.Assert.assertArrayEquals
import org.junit.Assert.assertEquals
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
