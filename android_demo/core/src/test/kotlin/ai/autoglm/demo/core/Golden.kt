package ai.autoglm.demo.core

import com.google.gson.JsonObject
import com.google.gson.JsonParser
import java.io.File

/**
 * Golden vectors written by `scripts/make_golden.py --bundle` from a tiny-checkpoint bundle: the
 * directory holds golden.json and the bundle's manifest.json and tokenizer.json. Its path comes
 * from the `golden.dir` system property; a missing directory is an error, never a skip.
 */
object Golden {
    val dir: File by lazy {
        val p = System.getProperty("golden.dir")
            ?: throw IllegalStateException("set -Dgolden.dir to a directory written by scripts/make_golden.py --bundle")
        val d = File(p)
        check(File(d, "golden.json").isFile) { "$d has no golden.json (run scripts/make_golden.py --bundle)" }
        d
    }
    val json: JsonObject by lazy { JsonParser.parseString(File(dir, "golden.json").readText()).asJsonObject }
    val manifest: BundleManifest by lazy { BundleManifest.parse(File(dir, "manifest.json").readText()) }
    val tokenizer: ByteLevelBpe by lazy { ByteLevelBpe.parse(File(dir, "tokenizer.json").readText()) }

    fun ints(o: JsonObject, key: String): IntArray {
        val a = o.getAsJsonArray(key)
        return IntArray(a.size()) { a.get(it).asInt }
    }

    fun floats(o: JsonObject): FloatArray {
        val a = o.getAsJsonArray("data")
        return FloatArray(a.size()) { a.get(it).asFloat }
    }

    fun longs(o: JsonObject): LongArray {
        val a = o.getAsJsonArray("data")
        return LongArray(a.size()) { a.get(it).asLong }
    }

    fun shape(o: JsonObject): IntArray = ints(o, "shape")
}
