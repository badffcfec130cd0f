package ai.autoglm.demo.core

import com.google.gson.JsonObject
import org.junit.Assert.assertArrayEquals
import org.junit.Assert.assertEquals
import org.junit.Assert.assertTrue

/**
 * Replays the host runner's recorded calls: each call must arrive in the recorded order with the
 * recorded inputs (integers exactly, floats to 1e-5), and returns the recorded output. A loop that
 * chunks, scatters, positions or feeds tokens differently fails here.
 */
class RecordedRuntime(private val calls: List<JsonObject>, override val maxContext: Int, override val prefillChunk: Int) : ModelRuntime {
    private var next = 0

    val remaining: Int get() = calls.size - next

    private fun take(method: String): JsonObject {
        assertTrue("unexpected extra call $method after ${calls.size} recorded calls", next < calls.size)
        val c = calls[next]
        assertEquals("call #$next", c.get("method").asString, method)
        next++
        return c
    }

    private fun checkInput(call: JsonObject, name: String, t: FloatTensor) {
        val want = call.getAsJsonObject("inputs").getAsJsonObject(name)
        assertArrayEquals("$name shape", Golden.shape(want), t.shape)
        assertArrayEquals("$name values", Golden.floats(want), t.data, 1e-5f)
    }

    private fun checkInput(call: JsonObject, name: String, t: LongTensor) {
        val want = call.getAsJsonObject("inputs").getAsJsonObject(name)
        assertArrayEquals("$name shape", Golden.shape(want), t.shape)
        assertArrayEquals("$name values", Golden.longs(want), t.data)
    }

    private fun output(call: JsonObject): FloatTensor {
        val o = call.getAsJsonObject("output")
        return FloatTensor(Golden.shape(o), Golden.floats(o))
    }

    override fun tokenEmbedding(inputIds: LongTensor): FloatTensor {
        val c = take("token_embedding")
        checkInput(c, "input_ids", inputIds)
        return output(c)
    }

    override fun visionEncoder(pixelValues: FloatTensor, method: String): FloatTensor {
        val c = take(method)
        checkInput(c, "pixel_values", pixelValues)
        return output(c)
    }

    override fun audioEncoder(inputFeatures: FloatTensor): FloatTensor {
        val c = take("audio_encoder")
        checkInput(c, "input_features", inputFeatures)
        return output(c)
    }

    override fun textDecoder(inputsEmbeds: FloatTensor, positionIds: LongTensor, cachePosition: LongTensor): FloatTensor {
        val c = take("text_decoder")
        checkInput(c, "inputs_embeds", inputsEmbeds)
        checkInput(c, "position_ids", positionIds)
        checkInput(c, "cache_position", cachePosition)
        return output(c)
    }

    override fun reset() {
        take("reset")
    }
}
