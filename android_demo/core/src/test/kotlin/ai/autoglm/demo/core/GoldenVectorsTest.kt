package ai.autoglm.demo.core

import com.google.gson.JsonObject
import org.junit.Assert.assertArrayEquals
import org.junit.Assert.assertEquals
import org.junit.Assert.assertTrue
import org.junit.Test

/** The app's logic against the exporter's host code, through golden vectors. */
class GoldenVectorsTest {
    private val g = Golden.json

    @Test
    fun manifestCarriesWhatTheAppNeeds() {
        val m = Golden.manifest
        assertTrue(m.target, BundleManifest.TARGETS_FOR_ANDROID.contains(m.target))
        for (name in listOf(BundleManifest.COMPONENT_EMBEDDING, BundleManifest.COMPONENT_DECODER, BundleManifest.COMPONENT_VISION)) {
            assertEquals(name, m.component(name).method)
        }
        val sp = g.getAsJsonObject("special_ids")
        for (k in sp.keySet()) assertEquals(k, sp.get(k).asInt, m.prompt.special(k, "manifest.json"))
        assertEquals(Golden.manifest.image.numTokens, Golden.shape(g.getAsJsonObject("pixel_values"))[0] / 4)
    }

    @Test
    fun tokenizerMatchesHuggingFaceTokenizers() {
        val cases = g.getAsJsonArray("tokenizer_cases")
        assertTrue(cases.size() >= 5)
        for (e in cases) {
            val c = e.asJsonObject
            val text = c.get("text").asString
            val ids = Golden.ints(c, "ids")
            assertArrayEquals("encode('$text')", ids, Golden.tokenizer.encode(text))
            if (!text.contains("<|")) assertEquals(text, Golden.tokenizer.decode(ids))
        }
    }

    @Test
    fun promptIdsAndTypes() {
        val m = Golden.manifest
        val p = ChatPrompt.build(Golden.tokenizer, m.prompt, g.get("prompt_text").asString, m.image.numTokens,
            m.audioTokens ?: 0)
        assertArrayEquals(Golden.ints(g, "prompt_ids"), p.ids)
        assertArrayEquals(Golden.ints(g, "token_types"), p.types)
    }

    @Test
    fun pixelsMatchPillowBicubicAndNormalisation() {
        val img = g.getAsJsonObject("image")
        val w = img.get("width").asInt
        val h = img.get("height").asInt
        assertTrue("the golden image must need resizing", w != Golden.manifest.image.width)
        val t = ImagePreprocessor.preprocess(Golden.ints(img, "rgb"), w, h, Golden.manifest.image)
        val want = g.getAsJsonObject("pixel_values")
        assertArrayEquals(Golden.shape(want), t.shape)
        assertArrayEquals(Golden.floats(want), t.data, 1e-5f)
    }

    @Test
    fun screenShapedImageGoesToTheHostsBucketWithTheHostsPixels() {
        val img = g.getAsJsonObject("screen_image")
        val x = ImagePreprocessor.prepare(Golden.ints(img, "rgb"), img.get("width").asInt, img.get("height").asInt,
            Golden.manifest.image)
        assertEquals(img.get("method").asString, x.method)
        assertTrue("a portrait bucket, not the first", x.method != BundleManifest.COMPONENT_VISION)
        assertArrayEquals(Golden.ints(img, "grid"), x.grid)
        val want = img.getAsJsonObject("pixel_values")
        assertArrayEquals(Golden.shape(want), x.pixels.shape)
        assertArrayEquals(Golden.floats(want), x.pixels.data, 1e-5f)
    }

    @Test
    fun transparencyIsCompositedOnWhiteLikeTheHost() {
        val img = g.getAsJsonObject("transparent_image")
        assertArrayEquals(Golden.ints(img, "rgb"), ImagePreprocessor.rgbOnWhite(Golden.ints(img, "argb")))
    }

    @Test
    fun logMelMatchesHostFrontEnd() {
        val audio = g.getAsJsonObject("audio") ?: return assertEquals(null, Golden.manifest.audio)
        val cfg = Golden.manifest.audio!!
        val wave = audio.getAsJsonArray("waveform")
        val x = FloatArray(wave.size()) { wave.get(it).asFloat }
        val mel = LogMel.compute(x, cfg)
        val want = audio.getAsJsonObject("log_mel")
        assertArrayEquals(intArrayOf(1) + Golden.shape(want), mel.shape)
        assertArrayEquals(Golden.floats(want), mel.data, 1e-5f)
    }

    @Test
    fun mropePositionsAndDecodePositions() {
        val m = Golden.manifest
        val types = Golden.ints(g, "token_types")
        val pos = MRopePositions.compute(types, listOf(m.image.mergedShape))
        val want = g.getAsJsonArray("positions")
        for (axis in 0 until 3) {
            val row = want.get(axis).asJsonArray
            val expect = LongArray(row.size()) { row.get(it).asLong }
            assertArrayEquals("axis $axis", expect, pos.slice(0, types.size).copyOfRange(axis * types.size, (axis + 1) * types.size))
        }
        assertEquals(g.get("rope_delta").asLong, pos.delta)
        for (e in g.getAsJsonArray("decode_positions")) {
            val d = e.asJsonObject
            val p = MRopePositions.decode(d.get("cache_index").asInt, pos.delta)
            assertArrayEquals(longArrayOf(d.get("position").asLong, d.get("position").asLong, d.get("position").asLong), p)
        }
    }

    @Test
    fun replayedGreedyLoopMatchesTheHostRunner() {
        val m = Golden.manifest
        val trace = g.getAsJsonObject("trace")
        val calls = trace.getAsJsonArray("calls").map { it.asJsonObject }
        val runtime = RecordedRuntime(calls, m.maxContext, m.prefillChunk)
        val prompt = ChatPrompt.build(Golden.tokenizer, m.prompt, g.get("prompt_text").asString, m.image.numTokens, m.audioTokens ?: 0)
        val img = g.getAsJsonObject("image")
        val pixels = ImagePreprocessor.preprocess(Golden.ints(img, "rgb"), img.get("width").asInt, img.get("height").asInt, m.image)
        val audios = ArrayList<FloatTensor>()
        val audio: JsonObject? = g.getAsJsonObject("audio")
        if (audio != null) {
            val wave = audio.getAsJsonArray("waveform")
            audios.add(LogMel.compute(FloatArray(wave.size()) { wave.get(it).asFloat }, m.audio!!))
        }
        val seen = ArrayList<Int>()
        val result = Generator(runtime, m.hiddenSize).generate(prompt, listOf(pixels),
            listOf(m.image.mergedShape), audios, trace.get("max_new_tokens").asInt,
            m.prompt.eosIds, object : TokenListener {
                override fun onToken(token: Int): Boolean {
                    seen.add(token)
                    return true
                }
            })
        assertArrayEquals(Golden.ints(trace, "tokens"), result.tokens)
        assertArrayEquals(result.tokens, seen.toIntArray())
        assertEquals("every recorded call was made", 0, runtime.remaining)
    }
}
