package ai.autoglm.demo.core

import com.google.gson.JsonObject
import com.google.gson.JsonParser
import org.junit.Assert.assertArrayEquals
import org.junit.Assert.assertEquals
import org.junit.Assert.assertTrue
import org.junit.Test
import java.io.File

/**
 * A qnn bundle (static prefill/decode graphs, host-held KV cache): the app's StaticGraphRuntime
 * must make the host runner's graph calls one for one (cos/sin, visibility mask and cache contents
 * to 1e-5) and reproduce its tokens. Golden vectors from -Dgolden.static.dir (make_golden.py --bundle
 * on a qnn bundle); a missing directory is an error, never a skip.
 */
class StaticGraphReplayTest {
    private val dir: File = File(System.getProperty("golden.static.dir")
        ?: throw IllegalStateException("set -Dgolden.static.dir to a golden directory of a qnn bundle"))
    private val g: JsonObject = JsonParser.parseString(File(dir, "golden.json").readText()).asJsonObject
    private val manifest = BundleManifest.parse(File(dir, "manifest.json").readText())

    private class Recorded(private val calls: List<JsonObject>) : GraphRunner {
        var next = 0
        override fun run(graph: String, inputs: LinkedHashMap<String, Any>): List<FloatTensor> {
            assertTrue("extra call of $graph", next < calls.size)
            val c = calls[next++]
            assertEquals("graph call #${next - 1}", c.get("graph").asString, graph)
            val want = c.getAsJsonObject("inputs")
            assertEquals("$graph inputs", want.keySet(), inputs.keys)
            for ((name, value) in inputs) {
                val w = want.getAsJsonObject(name)
                when (value) {
                    is FloatTensor -> {
                        assertArrayEquals("$graph.$name shape", Golden.shape(w), value.shape)
                        assertArrayEquals("$graph.$name", Golden.floats(w), value.data, 1e-5f)
                    }
                    is LongTensor -> assertArrayEquals("$graph.$name", Golden.longs(w), value.data)
                    else -> throw AssertionError("$name: unexpected input type")
                }
            }
            return c.getAsJsonArray("outputs").map { o -> FloatTensor(Golden.shape(o.asJsonObject), Golden.floats(o.asJsonObject)) }
        }
    }

    @Test
    fun manifestDescribesStaticGraphs() {
        assertTrue(manifest.isStatic)
        assertEquals("qnn", manifest.target)
        // the CI bundle's decoder is lowered in parts of one layer (recipes/qnn-tiny.yaml): one file per part
        val decode = manifest.decoderGraphs.map { it.second }
        assertEquals(listOf("text_decoder.00-00.pte:text_decoder_decode", "text_decoder.01-01.pte:text_decoder_decode"), decode)
        for (g in decode) {
            assertEquals(listOf("inputs_embeds", "cos", "sin", "mask"), manifest.graphs.getValue(g).inputNames.subList(0, 4))
            assertEquals("text_decoder_decode", manifest.graphs.getValue(g).method)
        }
        assertEquals("model.pte", manifest.graphs.getValue("token_embedding_decode").file)
        assertEquals(manifest.rope!!.invFreq.size, manifest.rope!!.axis.size)
    }

    @Test
    fun replayedStaticGraphGenerationMatchesTheHostRunner() {
        val trace = g.getAsJsonObject("trace")
        val calls = trace.getAsJsonArray("graph_calls").map { it.asJsonObject }
        val runner = Recorded(calls)
        val tokenizer = ByteLevelBpe.parse(File(dir, "tokenizer.json").readText())
        val prompt = ChatPrompt.build(tokenizer, manifest.prompt, g.get("prompt_text").asString, manifest.image.numTokens,
            manifest.audioTokens ?: 0)
        assertArrayEquals(Golden.ints(g, "prompt_ids"), prompt.ids)
        val img = g.getAsJsonObject("image")
        val pixels = ImagePreprocessor.preprocess(Golden.ints(img, "rgb"), img.get("width").asInt, img.get("height").asInt, manifest.image)
        val tokens = Generator(StaticGraphRuntime(manifest, runner), manifest.hiddenSize).generate(prompt, listOf(pixels),
            listOf(manifest.image.mergedShape), emptyList(), trace.get("max_new_tokens").asInt, manifest.prompt.eosIds).tokens
        assertArrayEquals(Golden.ints(trace, "tokens"), tokens)
        assertEquals("every recorded graph call was made", calls.size, runner.next)
    }
}
