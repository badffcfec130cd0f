package ai.autoglm.demo.core

import java.io.File
import java.io.FileInputStream
import java.security.MessageDigest

/** One input or output of a component: name, shape ("T" marks the dynamic token axis) and dtype. */
class TensorSpec(val name: String, val shape: List<String>, val dtype: String)

/** One program of a component: a method of a file; for a decoder lowered in parts, layers [first, end). */
class ProgramSpec(val file: String, val method: String, val firstLayer: Int, val endLayer: Int)

/**
 * A component of the bundle: which method of which file runs it, and its signature. A decoder
 * lowered in parts (recipe `lowering.decoder_layers_per_program`) has several [programs], run in
 * order: each takes the previous one's hidden states and keeps the KV cache of its own layers.
 */
class ComponentSpec(
    val name: String,
    val method: String,
    val file: String,
    val inputs: List<TensorSpec>,
    val outputs: List<TensorSpec>,
    val programs: List<ProgramSpec> = listOf(ProgramSpec(file, method, 0, 0))
)

class FileEntry(val bytes: Long, val sha256: String)

/**
 * A static graph of an NPU bundle (qnn): which method of which file runs it, and its inputs in call
 * order. [name] is its key in [BundleManifest.graphs]: the method name, or "file:method" for the
 * graphs of a decoder lowered in parts (every part file has the same methods).
 */
class StaticGraphSpec(val name: String, val file: String, val method: String, val inputNames: List<String>, val inputShapes: List<IntArray>)

/** The decoder's rotary table for host-side cos/sin: one inverse frequency and position axis per pair. */
class RopeTable(val invFreq: FloatArray, val axis: IntArray)

/** One image size of the bundle (preprocessing.buckets) and the vision method compiled for it. */
class ImageBucket(val height: Int, val width: Int, val method: String)

/**
 * Image preprocessing at one bucket's size ([height] x [width]: the first bucket's, the
 * `vision_encoder` method, unless [at] picked another). [choose] finds the bucket closest to an
 * image in aspect ratio, as the exporter's host code does.
 */
class ImageConfig(
    val height: Int,
    val width: Int,
    val patchSize: Int,
    val mergeSize: Int,
    val rescaleFactor: Double,
    val mean: DoubleArray,
    val std: DoubleArray,
    val resample: String,
    val buckets: List<ImageBucket> = listOf(ImageBucket(height, width, BundleManifest.COMPONENT_VISION))
) {
    /** The bucket closest to a [w] x [h] image in aspect ratio (log scale), the first on a tie. */
    fun choose(w: Int, h: Int): ImageBucket {
        val ratio = Math.log(Math.max(w, 1).toDouble() / Math.max(h, 1))
        return buckets.minBy { Math.abs(ratio - Math.log(it.width.toDouble() / it.height)) }!!
    }

    /** This preprocessing at [bucket]'s size. */
    fun at(bucket: ImageBucket): ImageConfig =
        ImageConfig(bucket.height, bucket.width, patchSize, mergeSize, rescaleFactor, mean, std, resample, buckets)

    val gridRows: Int get() = height / patchSize
    val gridCols: Int get() = width / patchSize
    /** (rows, cols) of the image tokens after the merge: their count and their M-RoPE layout. */
    val mergedShape: IntArray get() = intArrayOf(gridRows / mergeSize, gridCols / mergeSize)
    val numTokens: Int get() = (gridRows / mergeSize) * (gridCols / mergeSize)
}

class AudioConfig(val frames: Int, val melBins: Int, val sampleRate: Int, val nFft: Int, val hopLength: Int) {
    val samples: Int get() = frames * hopLength
}

/**
 * `layout`: the chat template as token pieces; `layoutWritten` false for bundles written before
 * `prompt.layout` (GLM-4.1V's built-in layout then); written but null when the exporter found the
 * template inexpressible as pieces (`layoutUnavailable` says why).
 */
class PromptConfig(
    val specialIds: Map<String, Int>,
    val eosIds: IntArray,
    val bosId: Int?,
    val layout: PromptLayout? = null,
    val layoutWritten: Boolean = false,
    val layoutUnavailable: String? = null
) {
    fun special(name: String, file: String): Int = specialIds[name]
        ?: throw BundleError(file, "prompt.special_ids.$name", "the id of the chat token '$name'", "nothing",
            "re-export the bundle with autoglm-export")

    /** The pieces conversations are assembled from; refuses a bundle whose template has none. */
    fun chatLayout(tokenizer: ByteLevelBpe): PromptLayout {
        if (layout != null) return layout
        if (!layoutWritten) return PromptLayout.builtin(tokenizer, this)
        val why = layoutUnavailable ?: "no reason given"
        throw BundleError(BundleManifest.MANIFEST, "prompt.layout", "the chat template as token pieces",
            "none (${if (why.length > 160) why.substring(0, 160) + "..." else why})",
            "chat with this bundle through `autoglm-export serve`, or export a checkpoint whose template the apps can follow")
    }
}

/**
 * The bundle's manifest.json, read the way the app needs it. Nothing model-specific is hard-coded
 * in the app: sizes, token ids, preprocessing and method names all come from here.
 */
class BundleManifest(
    val target: String,
    val files: Map<String, FileEntry>,
    val components: Map<String, ComponentSpec>,
    val maxContext: Int,
    val prefillChunk: Int,
    val image: ImageConfig,
    val audio: AudioConfig?,
    val prompt: PromptConfig,
    val vocabSize: Int,
    val hiddenSize: Int,
    val positionScheme: String,
    val graphs: Map<String, StaticGraphSpec>,
    val rope: RopeTable?
) {
    /** Static-graph bundles (qnn) run prefill/decode graphs with a host-held KV cache. */
    val isStatic: Boolean get() = graphs.isNotEmpty()

    /**
     * The decoder's (prefill, decode) graph keys of each of its programs in layer order: one pair,
     * or one per part of a decoder lowered in parts (hidden states flow from each to the next).
     */
    val decoderGraphs: List<Pair<String, String>>
        get() {
            val programs = component(COMPONENT_DECODER).programs
            if (programs.size == 1 && programs[0].endLayer == 0) return listOf(Pair("text_decoder_prefill", "text_decoder_decode"))
            return programs.map { Pair("${it.file}:text_decoder_prefill", "${it.file}:text_decoder_decode") }
        }

    fun component(name: String): ComponentSpec = components[name]
        ?: throw BundleError(MANIFEST, "components.$name", "a '$name' component", "none",
            "export the bundle from a checkpoint that has it")

    /** Tokens an audio clip occupies in the prompt (the audio encoder's output rows). */
    val audioTokens: Int?
        get() {
            val c = components["audio_encoder"] ?: return null
            return c.outputs[0].shape[0].toInt()
        }

    companion object {
        const val MANIFEST = "manifest.json"
        const val TOKENIZER = "tokenizer.json"
        const val SCHEMA_VERSION = 1
        const val COMPONENT_VISION = "vision_encoder"
        const val COMPONENT_EMBEDDING = "token_embedding"
        const val COMPONENT_DECODER = "text_decoder"
        const val COMPONENT_AUDIO = "audio_encoder"
        val TARGETS_FOR_ANDROID = listOf("xnnpack", "qnn")

        fun parse(text: String, file: String = MANIFEST): BundleManifest {
            val root = JsonNode.parse(file, text)
            val version = root.reqInt("schema_version")
            if (version != SCHEMA_VERSION) {
                throw BundleError(file, "schema_version", SCHEMA_VERSION.toString(), version.toString(),
                    "use an app built for this bundle format, or re-export")
            }
            val filesNode = root.reqObj("files")
            val files = LinkedHashMap<String, FileEntry>()
            for (name in filesNode.keys()) {
                val f = filesNode.reqObj(name)
                files[name] = FileEntry(f.reqLong("bytes"), f.reqString("sha256"))
            }
            val compsNode = root.reqObj("components")
            val comps = LinkedHashMap<String, ComponentSpec>()
            val graphs = LinkedHashMap<String, StaticGraphSpec>()
            var rope: RopeTable? = null
            for (name in compsNode.keys()) {
                val c = compsNode.reqObj(name)
                val method = c.reqString("method")
                val mainFile = c.reqString("file")
                refuseDataFile(c, file, "components.$name")
                val programs = ArrayList<ProgramSpec>()
                val parts = if (c.opt("programs") != null) c.reqArray("programs") else null
                if (parts == null) {
                    programs.add(ProgramSpec(mainFile, method, 0, 0))
                    readGraphs(c, mainFile, "", graphs)
                } else {
                    for (i in 0 until parts.size()) {
                        val p = c.child("programs[$i]", parts.get(i))
                        val layers = p.reqInts("layers")
                        val partFile = p.reqString("file")
                        refuseDataFile(p, file, "components.$name.programs[$i]")
                        programs.add(ProgramSpec(partFile, p.reqString("method"), layers[0], layers[1]))
                        if (i > 0 && layers[0] != programs[i - 1].endLayer) {
                            throw BundleError(file, "components.$name.programs[$i].layers", "layers starting at ${programs[i - 1].endLayer}",
                                "${layers[0]}", "re-export the bundle")
                        }
                        readGraphs(p, partFile, "$partFile:", graphs)
                    }
                }
                comps[name] = ComponentSpec(name, method, mainFile, tensorSpecs(c, "inputs"), tensorSpecs(c, "outputs"), programs)
                val r = c.optObj("rope")
                if (r != null) {
                    val inv = r.reqDoubles("inv_freq")
                    rope = RopeTable(FloatArray(inv.size) { inv[it].toFloat() }, r.reqInts("axis"))
                }
            }
            for (required in listOf(COMPONENT_EMBEDDING, COMPONENT_DECODER)) {
                if (!comps.containsKey(required)) {
                    throw BundleError(file, "components.$required", "a '$required' component", "none", "re-export the bundle")
                }
            }
            val shapes = root.reqObj("shapes")
            val pre = root.reqObj("preprocessing")
            val buckets = pre.reqArray("buckets")
            if (buckets.size() == 0) throw BundleError(file, "preprocessing.buckets", "at least one image bucket", "[]", "re-export the bundle")
            val sizes = (0 until buckets.size()).map { i ->
                val b = pre.child("buckets[$i]", buckets.get(i))
                val method = b.reqString("method")
                if ((i == 0 && method != COMPONENT_VISION) || !comps.containsKey(method)) {
                    throw BundleError(file, "preprocessing.buckets[$i].method", "a vision component of the bundle", method, "re-export the bundle")
                }
                ImageBucket(b.reqInt("height"), b.reqInt("width"), method)
            }
            val image = ImageConfig(sizes[0].height, sizes[0].width, pre.reqInt("patch_size"), pre.reqInt("merge_size"),
                pre.reqDouble("rescale_factor"), pre.reqDoubles("image_mean"), pre.reqDoubles("image_std"),
                pre.reqString("resample"), sizes)
            if (image.resample != "bicubic") {
                throw BundleError(file, "preprocessing.resample", "bicubic", image.resample, "re-export the bundle")
            }
            val audioNode = root.optObj("audio_preprocessing")
            val audio = if (audioNode == null) null else AudioConfig(audioNode.reqInt("frames"), audioNode.reqInt("mel_bins"),
                audioNode.reqInt("sample_rate"), audioNode.reqInt("n_fft"), audioNode.reqInt("hop_length"))
            val promptNode = root.reqObj("prompt")
            val sp = promptNode.reqObj("special_ids")
            val special = LinkedHashMap<String, Int>()
            for (k in sp.keys()) special[k] = sp.reqInt(k)
            val bos = promptNode.opt("bos_id")
            val layoutNode = promptNode.optObj("layout")
            val prompt = PromptConfig(special, promptNode.reqInts("eos_ids"), bos?.asInt,
                layoutNode?.let { PromptLayout.parse(it) }, promptNode.obj.has("layout"),
                promptNode.opt("layout_unavailable")?.asString)
            val text = root.reqObj("model").reqObj("text")
            val positions = root.reqObj("positions")
            val scheme = positions.reqString("scheme")
            if (scheme != "mrope-3axis") {
                throw BundleError(file, "positions.scheme", "mrope-3axis", scheme, "use an app that implements this position scheme")
            }
            return BundleManifest(root.reqString("target"), files, comps, shapes.reqInt("max_context"),
                shapes.reqInt("prefill_chunk"), image, audio, prompt, text.reqInt("vocab_size"),
                text.reqInt("hidden_size"), scheme, graphs, rope)
        }

        /**
         * A program whose weights sit in a .ptd beside its .pte (recipe lowering.external_weights): the
         * ExecuTorch Android Module API (executorch-android 1.5.1) loads a .pte alone, with no data file.
         */
        private fun refuseDataFile(node: JsonNode, file: String, field: String) {
            val data = node.opt("data_file") ?: return
            throw BundleError(file, "$field.data_file", "programs with their weights inside the .pte", data.asString,
                "re-export without lowering.external_weights in the recipe (ExecuTorch's Android Module loads no .ptd)")
        }

        /** The static graphs of a component or decoder part [node] in [file], keyed [prefix] + method name. */
        private fun readGraphs(node: JsonNode, file: String, prefix: String, into: MutableMap<String, StaticGraphSpec>) {
            val gs = node.optObj("graphs") ?: return
            if (gs.obj.size() == 0 || gs.reqObj(gs.keys()[0]).opt("inputs") == null) return // not a static-graph bundle
            for (g in gs.keys()) {
                val arr = gs.reqObj(g).reqArray("inputs")
                val names = ArrayList<String>()
                val shapes = ArrayList<IntArray>()
                for (i in 0 until arr.size()) {
                    val t = gs.child("$g.inputs[$i]", arr.get(i))
                    names.add(t.reqString("name"))
                    shapes.add(t.reqInts("shape"))
                }
                into[prefix + g] = StaticGraphSpec(prefix + g, file, g, names, shapes)
            }
        }

        private fun tensorSpecs(c: JsonNode, key: String): List<TensorSpec> {
            val out = ArrayList<TensorSpec>()
            val arr = c.reqArray(key)
            for (i in 0 until arr.size()) {
                val t = c.child("$key[$i]", arr.get(i))
                val dims = t.reqArray("shape")
                val shape = ArrayList<String>()
                for (j in 0 until dims.size()) shape.add(dims.get(j).asString)
                out.add(TensorSpec(t.reqString("name"), shape, t.reqString("dtype")))
            }
            return out
        }

        /** Read a bundle directory and check every file's size and SHA-256 before anything loads. */
        fun load(dir: File): BundleManifest {
            val mfile = File(dir, MANIFEST)
            if (!mfile.isFile) {
                throw BundleError(mfile.path, null, "a bundle's manifest.json", "no such file",
                    "push the whole --out directory of autoglm-export to the device")
            }
            val manifest = parse(mfile.readText(Charsets.UTF_8), mfile.path)
            // every file the runtime opens: named relative, inside the bundle, and hashed below
            for (name in manifest.files.keys) checkInside(dir, name, "files")
            val opened = manifest.components.values.flatMap { c -> c.programs.map { it.file } + c.file } + TOKENIZER
            for (name in opened) {
                checkInside(dir, name, "components")
                if (!manifest.files.containsKey(name)) {
                    throw BundleError(mfile.path, "files", "an entry with the sha256 of $name", "none", "re-export the bundle")
                }
            }
            for ((name, entry) in manifest.files) {
                val f = File(dir, name)
                if (!f.isFile || f.length() != entry.bytes) {
                    throw BundleError(f.path, null, "${entry.bytes} bytes", if (f.isFile) "${f.length()}" else "missing",
                        "push the bundle again; it is incomplete")
                }
                val digest = sha256(f)
                if (digest != entry.sha256) {
                    throw BundleError(f.path, "files.$name.sha256", entry.sha256, digest, "push the bundle again; this file is corrupted")
                }
            }
            return manifest
        }

        /** [name] stays inside [dir]: relative, no '..' or hidden part, and so after resolving symlinks. */
        private fun checkInside(dir: File, name: String, field: String) {
            val parts = name.split("/")
            val plain = name.isNotEmpty() && !name.startsWith("/") && !name.contains('\\') &&
                parts.all { it.isNotEmpty() && !it.startsWith(".") } && (parts.size == 1 || parts[0].endsWith(".mlpackage"))
            if (!plain || !File(dir, name).canonicalPath.startsWith(dir.canonicalPath + File.separator)) {
                throw BundleError(File(dir, MANIFEST).path, field, "a file name inside the bundle", name.take(120),
                    "re-export the bundle; a manifest may not point outside it")
            }
        }

        fun sha256(f: File): String {
            val md = MessageDigest.getInstance("SHA-256")
            val buf = ByteArray(1 shl 20)
            FileInputStream(f).use { s ->
                while (true) {
                    val n = s.read(buf)
                    if (n < 0) break
                    md.update(buf, 0, n)
                }
            }
            val sb = StringBuilder()
            for (b in md.digest()) sb.append(String.format("%02x", b))
            return sb.toString()
        }
    }
}
