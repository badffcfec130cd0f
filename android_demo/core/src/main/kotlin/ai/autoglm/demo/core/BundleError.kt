package ai.autoglm.demo.core

/**
 * A bundle the app cannot use. The message is one line naming the file, the field, what was
 * expected and what to do, the same shape as the exporter's own errors.
 */
class BundleError(
    val file: String,
    val field: String?,
    val expected: String?,
    val got: String?,
    val fix: String
) : Exception(format(file, field, expected, got, fix)) {
    companion object {
        fun format(file: String, field: String?, expected: String?, got: String?, fix: String): String {
            val sb = StringBuilder(file)
            if (field != null) sb.append(": field '").append(field).append("'")
            if (expected != null) sb.append(": expected ").append(expected)
            if (got != null) sb.append(", got ").append(got)
            sb.append("; fix: ").append(fix)
            return sb.toString()
        }
    }
}
