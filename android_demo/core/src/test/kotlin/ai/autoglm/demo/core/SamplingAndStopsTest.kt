package ai.autoglm.demo.core

import org.junit.Assert.assertArrayEquals
import org.junit.Assert.assertEquals
import org.junit.Assert.assertFalse
import org.junit.Assert.assertTrue
import org.junit.Test

/**
 * Sampling (temperature, top-k, top-p, penalties, seed) and stop strings, as the exporter's host
 * computes them (host/sampling.py, ChatEngine). Draws are checked in distribution (the random
 * source is not torch's); stop strings against a runtime that answers a scripted token sequence.
 */
class SamplingAndStopsTest {
    private fun ln(x: Double) = Math.log(x).toFloat()

    private fun frequencies(s: Sampling, logits: FloatArray, n: Int): DoubleArray {
        val counts = DoubleArray(logits.size)
        repeat(n) { counts[s.choose(logits, emptyList())] += 1.0 }
        return DoubleArray(logits.size) { counts[it] / n }
    }

    @Test
    fun temperatureZeroAndTopKOneAreGreedy() {
        val logits = floatArrayOf(0.1f, 2f, 1.9f, -1f)
        assertTrue(Sampling().greedy)
        assertEquals(1, Sampling().choose(logits, emptyList()))
        repeat(50) { assertEquals(1, Sampling(temperature = 5f, topK = 1).choose(logits, emptyList())) }
        assertEquals(2, Sampling(penalties = Penalties(0.2f)).choose(logits, listOf(1)))  // penalties before greedy
    }

    @Test
    fun drawsFollowTheSoftmaxAtTheTemperature() {
        val logits = floatArrayOf(0f, ln(3.0))
        assertEquals(0.75, frequencies(Sampling(temperature = 1f, seed = 1), logits, 8000)[1], 0.02)
        // at temperature 2 the odds are sqrt(3) : 1
        assertEquals(Math.sqrt(3.0) / (1 + Math.sqrt(3.0)), frequencies(Sampling(temperature = 2f, seed = 2), logits, 8000)[1], 0.02)
    }

    @Test
    fun topPKeepsTheSmallestHeadReachingItsMass() {
        val logits = floatArrayOf(ln(1.0), ln(6.0), ln(3.0))  // 0.1, 0.6, 0.3
        assertArrayEquals(doubleArrayOf(0.0, 1.0, 0.0), frequencies(Sampling(temperature = 1f, topP = 0.5f, seed = 3), logits, 500), 0.0)
        val f = frequencies(Sampling(temperature = 1f, topP = 0.7f, seed = 4), logits, 6000)
        assertEquals(0.0, f[0], 0.0)  // the 0.9 before it reaches 0.7: dropped
        assertEquals(2.0 / 3, f[1], 0.02)
    }

    @Test
    fun topKCutsBeforeTopP() {
        val logits = floatArrayOf(ln(1.0), ln(6.0), ln(3.0))
        val f = frequencies(Sampling(temperature = 1f, topK = 2, seed = 5), logits, 6000)
        assertEquals(0.0, f[0], 0.0)
        assertEquals(2.0 / 3, f[1], 0.02)
    }

    @Test
    fun penaltiesApplyBeforeSampling() {
        val s = Sampling(temperature = 1f, penalties = Penalties(frequency = 50f), seed = 6)
        val logits = floatArrayOf(5f, 0f, 0f)
        repeat(200) { assertTrue(s.choose(logits, listOf(0)) != 0) }
    }

    @Test
    fun aSeedRepeatsItsDraws() {
        val logits = FloatArray(50) { (it % 7).toFloat() * 0.3f }
        val draw = { seed: Long -> Sampling(temperature = 1f, seed = seed).let { s -> IntArray(40) { s.choose(logits, emptyList()) } } }
        assertArrayEquals(draw(42), draw(42))
        assertFalse(draw(42).contentEquals(draw(43)))
    }

    @Test(expected = IllegalArgumentException::class)
    fun aTopPOfZeroIsRefused() {
        Sampling(temperature = 1f, topP = 0f)
    }

    /** Answers the scripted tokens in order, one per decoder call (the prompt fits one prefill chunk). */
    private class ScriptedRuntime(private val script: IntArray, private val vocab: Int, private val hidden: Int) : ModelRuntime {
        override val maxContext = 4096
        override val prefillChunk = 4096
        var decoderCalls = 0

        override fun tokenEmbedding(inputIds: LongTensor) = FloatTensor(intArrayOf(1, inputIds.shape[1], hidden), FloatArray(inputIds.shape[1] * hidden))
        override fun visionEncoder(pixelValues: FloatTensor, method: String): FloatTensor = throw AssertionError("no images here")
        override fun audioEncoder(inputFeatures: FloatTensor): FloatTensor = throw AssertionError("no audio here")
        override fun reset() {}

        override fun textDecoder(inputsEmbeds: FloatTensor, positionIds: LongTensor, cachePosition: LongTensor): FloatTensor {
            val logits = FloatArray(vocab)
            logits[script[decoderCalls++]] = 1f
            return FloatTensor(intArrayOf(1, vocab), logits)
        }
    }

    private fun session(answer: String): Pair<ChatSession, ScriptedRuntime> {
        val m = Golden.manifest
        val ids = Golden.tokenizer.encode(answer) + m.prompt.eosIds[0]
        val rt = ScriptedRuntime(ids, m.vocabSize, m.hiddenSize)
        return Pair(ChatSession(rt, m, Golden.tokenizer), rt)
    }

    private val ask = listOf(Message.text("user", "go"))

    @Test
    fun aStopStringEndsTheAnswerBeforeIt() {
        val (chat, rt) = session("tap the icon. finish(message=done) and more")
        val pieces = ArrayList<String>()
        val turn = chat.chat(ask, 100, stop = listOf("finish("), onText = { pieces.add(it) })
        assertEquals("tap the icon. ", turn.text)
        assertEquals("stop", turn.finishReason)
        assertEquals("nothing shown is taken back", turn.text, pieces.joinToString(""))
        // generation ended at the token that completed the stop string, and asked the decoder no more
        assertTrue(Golden.tokenizer.decode(turn.tokens).contains("finish("))
        assertFalse(Golden.tokenizer.decode(turn.tokens.copyOfRange(0, turn.tokens.size - 1)).contains("finish("))
        assertEquals(turn.tokens.size, rt.decoderCalls)
    }

    @Test
    fun multiByteCharactersSplitOverTokensComeOutWhole() {
        val answer = "点击「设置」图标。finish(message=完成)"
        val (chat, _) = session(answer)
        val pieces = ArrayList<String>()
        val turn = chat.chat(ask, 100, stop = listOf("finish("), onText = { pieces.add(it) })
        assertTrue("the tiny tokenizer splits these characters over several tokens", turn.tokens.size > "点击「设置」图标。finish(".length)
        assertEquals("点击「设置」图标。", turn.text)
        assertEquals(turn.text, pieces.joinToString(""))
        assertFalse(pieces.any { it.contains('\uFFFD') })
        val whole = session(answer).first.chat(ask, 100)
        assertEquals(answer, whole.text)
    }

    @Test
    fun withoutAStopStringTheAnswerRunsToItsEnd() {
        val answer = "tap the icon. finish(message=done)"
        val (chat, _) = session(answer)
        val pieces = ArrayList<String>()
        val turn = chat.chat(ask, 100, onText = { pieces.add(it) })
        assertEquals(answer, turn.text)
        assertEquals("stop", turn.finishReason)  // the end-of-turn token
        assertEquals(answer, pieces.joinToString(""))
        assertEquals("length", session(answer).first.chat(ask, 3).finishReason)
    }

    @Test
    fun reasoningIsSplitFromTheAnswer() {
        assertEquals(Pair("look at the screen", "do(action=\"Tap\")"), Reasoning.split("<think>look at the screen</think>do(action=\"Tap\")"))
        assertEquals(Pair("", "plain"), Reasoning.split("plain"))
        assertEquals(Pair("still thinking", ""), Reasoning.split("\n<think>still thinking"))
        val (chat, _) = session("<think>why</think>answer")
        assertEquals(Pair("why", "answer"), chat.chat(ask, 100).reasoningAndAnswer)
    }
}
