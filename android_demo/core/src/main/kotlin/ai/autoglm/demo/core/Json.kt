package ai.autoglm.demo.core

import com.google.gson.JsonArray
import com.google.gson.JsonElement
import com.google.gson.JsonObject
import com.google.gson.JsonParser

/**
 * Typed access to a JSON object with one-line errors that name the file and the key path.
 * Every manifest read in the app goes through [req] or [opt]: the repository's contract test
 * collects their key arguments and checks them against the manifests the exporter writes.
 */
class JsonNode(val file: String, val path: String, val obj: JsonObject) {

    fun req(key: String): JsonElement {
        val e = obj.get(key)
        if (e == null || e.isJsonNull) {
            throw BundleError(file, where(key), "a value", "nothing", "re-export the bundle with autoglm-export")
        }
        return e
    }

    fun opt(key: String): JsonElement? {
        val e = obj.get(key)
        return if (e == null || e.isJsonNull) null else e
    }

    fun reqObj(key: String): JsonNode = node(key, req(key))

    fun optObj(key: String): JsonNode? {
        val e = opt(key) ?: return null
        return node(key, e)
    }

    fun reqInt(key: String): Int = number(key, req(key)).toInt()

    fun reqLong(key: String): Long = number(key, req(key)).toLong()

    fun reqDouble(key: String): Double = number(key, req(key)).toDouble()

    fun reqString(key: String): String {
        val e = req(key)
        if (!e.isJsonPrimitive || !e.asJsonPrimitive.isString) throw wrongType(key, "a string", e)
        return e.asString
    }

    fun reqInts(key: String): IntArray {
        val a = array(key, req(key))
        return IntArray(a.size()) { i -> number(key, a.get(i)).toInt() }
    }

    fun reqDoubles(key: String): DoubleArray {
        val a = array(key, req(key))
        return DoubleArray(a.size()) { i -> number(key, a.get(i)).toDouble() }
    }

    fun reqArray(key: String): JsonArray = array(key, req(key))

    fun keys(): List<String> = obj.keySet().toList()

    fun child(key: String, e: JsonElement): JsonNode = node(key, e)

    private fun node(key: String, e: JsonElement): JsonNode {
        if (!e.isJsonObject) throw wrongType(key, "an object", e)
        return JsonNode(file, where(key), e.asJsonObject)
    }

    private fun number(key: String, e: JsonElement): Number {
        if (!e.isJsonPrimitive || !e.asJsonPrimitive.isNumber) throw wrongType(key, "a number", e)
        return e.asNumber
    }

    private fun array(key: String, e: JsonElement): JsonArray {
        if (!e.isJsonArray) throw wrongType(key, "an array", e)
        return e.asJsonArray
    }

    private fun wrongType(key: String, what: String, e: JsonElement): BundleError {
        val shown = e.toString()
        return BundleError(file, where(key), what, if (shown.length > 40) shown.substring(0, 40) + "..." else shown,
            "re-export the bundle with autoglm-export")
    }

    private fun where(key: String): String = if (path.isEmpty()) key else "$path.$key"

    companion object {
        fun parse(file: String, text: String): JsonNode {
            val e: JsonElement = try {
                JsonParser.parseString(text)
            } catch (ex: Exception) {
                throw BundleError(file, null, "valid JSON", ex.javaClass.simpleName, "re-export the bundle with autoglm-export")
            }
            if (!e.isJsonObject) throw BundleError(file, null, "a JSON object", e.javaClass.simpleName, "re-export the bundle")
            return JsonNode(file, "", e.asJsonObject)
        }
    }
}
