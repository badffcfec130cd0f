package ai.autoglm.demo.core

/** Runs one static graph (a method of one of the bundle's files) with named inputs; outputs in graph order. */
interface GraphRunner {
    /**
     * [graph] is the graph's key in [BundleManifest.graphs] (its spec names the file and method);
     * [inputs] maps input names to FloatTensor or LongTensor values, in the graph's call order.
     */
    fun run(graph: String, inputs: LinkedHashMap<String, Any>): List<FloatTensor>
}

/**
 * [ModelRuntime] over the static graphs of an NPU bundle (qnn), a port of the exporter's host
 * StaticGraphRuntime: a call of exactly prefill_chunk tokens runs the *_prefill graph, any other
 * length runs the *_decode graph token by token; the host holds the KV cache, computes the M-RoPE
 * cos/sin from the manifest's rotary table and the 0/1 visibility of the cached slots followed by
 * the new tokens, and writes the returned keys/values at their slots. A decoder lowered in parts
 * runs its programs in layer order, the hidden states of each feeding the next, each with the
 * caches of its own layers.
 */
class StaticGraphRuntime(private val manifest: BundleManifest, private val runner: GraphRunner) : ModelRuntime {
    override val maxContext: Int get() = manifest.maxContext
    override val prefillChunk: Int get() = manifest.prefillChunk
    private val decoderGraphs: List<Pair<String, String>> = manifest.decoderGraphs
    private var caches: List<List<FloatArray>> = emptyList() // per decoder program, per cache input

    init {
        reset()
    }

    override fun reset() {
        caches = decoderGraphs.map { (_, decode) -> spec(decode).inputShapes.drop(4).map { FloatArray(numel(it)) } }
    }

    private fun spec(graph: String): StaticGraphSpec = manifest.graphs[graph] ?: throw BundleError(BundleManifest.MANIFEST,
        "components.text_decoder.graphs.$graph", "the $graph graph", "none", "re-export the bundle with autoglm-export")

    override fun tokenEmbedding(inputIds: LongTensor): FloatTensor {
        val t = inputIds.data.size
        if (t == prefillChunk) return run1("token_embedding_prefill", "input_ids", inputIds)
        val parts = (0 until t).map { run1("token_embedding_decode", "input_ids", LongTensor(intArrayOf(1, 1), longArrayOf(inputIds.data[it]))) }
        val h = parts[0].data.size
        val out = FloatArray(t * h)
        for (i in parts.indices) System.arraycopy(parts[i].data, 0, out, i * h, h)
        return FloatTensor(intArrayOf(1, t, h), out)
    }

    override fun visionEncoder(pixelValues: FloatTensor, method: String): FloatTensor = run1(method, "pixel_values", pixelValues)

    override fun audioEncoder(inputFeatures: FloatTensor): FloatTensor = run1("audio_encoder", "input_features", inputFeatures)

    private fun run1(graph: String, name: String, x: Any): FloatTensor {
        val inputs = LinkedHashMap<String, Any>()
        inputs[name] = x
        return runner.run(graph, inputs)[0]
    }

    override fun textDecoder(inputsEmbeds: FloatTensor, positionIds: LongTensor, cachePosition: LongTensor): FloatTensor {
        val t = cachePosition.data.size
        if (t == prefillChunk) return decoderCall(true, inputsEmbeds, positionIds, cachePosition)
        val h = inputsEmbeds.shape[2]
        var logits: FloatTensor? = null
        for (i in 0 until t) { // static shapes: a shorter chunk goes token by token
            val x = FloatTensor(intArrayOf(1, 1, h), inputsEmbeds.data.copyOfRange(i * h, (i + 1) * h))
            val p = LongTensor(intArrayOf(3, 1), longArrayOf(positionIds.data[i], positionIds.data[t + i], positionIds.data[2 * t + i]))
            logits = decoderCall(false, x, p, LongTensor(intArrayOf(1), longArrayOf(cachePosition.data[i])))
        }
        return logits!!
    }

    private fun decoderCall(prefill: Boolean, x: FloatTensor, pos: LongTensor, slots: LongTensor): FloatTensor {
        val rope = manifest.rope ?: throw BundleError(BundleManifest.MANIFEST, "components.text_decoder.rope", "the rotary table",
            "none", "re-export the bundle with autoglm-export")
        val t = slots.data.size
        val start = slots.data[0].toInt()
        val cs = cosSin(rope, pos, t)
        val mask = visibility(start, t, maxContext)
        var h = x
        for ((k, graphs) in decoderGraphs.withIndex()) { // hidden states flow from each part to the next
            val graph = if (prefill) graphs.first else graphs.second
            val spec = spec(graph)
            val own = caches[k]
            val inputs = LinkedHashMap<String, Any>()
            inputs["inputs_embeds"] = h
            inputs["cos"] = cs[0]
            inputs["sin"] = cs[1]
            inputs["mask"] = mask
            for (i in own.indices) inputs[spec.inputNames[4 + i]] = FloatTensor(spec.inputShapes[4 + i], own[i])
            val out = runner.run(graph, inputs)
            for (i in own.indices) writeSlots(own[i], spec.inputShapes[4 + i], out[1 + i], start, t)
            h = out[0]
        }
        return h
    }

    companion object {
        /** cos, sin [1, 1, T, head_dim]: each rotary pair uses its own position axis and frequency. */
        fun cosSin(rope: RopeTable, pos: LongTensor, t: Int): Array<FloatTensor> {
            val half = rope.invFreq.size
            val cos = FloatArray(t * 2 * half)
            val sin = FloatArray(t * 2 * half)
            for (i in 0 until t) for (j in 0 until half) {
                val f = pos.data[rope.axis[j] * t + i].toFloat() * rope.invFreq[j] // float32, as the host
                val c = Math.cos(f.toDouble()).toFloat()
                val s = Math.sin(f.toDouble()).toFloat()
                cos[i * 2 * half + 2 * j] = c
                cos[i * 2 * half + 2 * j + 1] = c
                sin[i * 2 * half + 2 * j] = s
                sin[i * 2 * half + 2 * j + 1] = s
            }
            val shape = intArrayOf(1, 1, t, 2 * half)
            return arrayOf(FloatTensor(shape, cos), FloatTensor(shape, sin))
        }

        /** [1, 1, T, C + T]: 1 for cached slots before [start] and for new tokens up to their own. */
        fun visibility(start: Int, t: Int, context: Int): FloatTensor {
            val w = context + t
            val m = FloatArray(t * w)
            for (i in 0 until t) {
                for (j in 0 until context) if (j < start) m[i * w + j] = 1f
                for (j in 0..i) m[i * w + context + j] = 1f
            }
            return FloatTensor(intArrayOf(1, 1, t, w), m)
        }

        /** cache [1, kv, C, d] <- new [1, kv, T, d] at slots start until start + T. */
        private fun writeSlots(cache: FloatArray, shape: IntArray, new: FloatTensor, start: Int, t: Int) {
            val kv = shape[1]
            val c = shape[2]
            val d = shape[3]
            for (h in 0 until kv) for (i in 0 until t) {
                System.arraycopy(new.data, (h * t + i) * d, cache, (h * c + start + i) * d, d)
            }
        }
    }
}
