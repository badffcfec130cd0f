package ai.autoglm.demo.core

import org.junit.Assert.assertEquals
import org.junit.Assert.assertTrue
import org.junit.Assert.fail
import org.junit.Rule
import org.junit.Test
import org.junit.rules.TemporaryFolder
import java.io.File

/** Bad bundles get one-line errors naming the file and field; a tampered file is refused. */
class BundleErrorsTest {
    @get:Rule
    val tmp = TemporaryFolder()

    private fun expectError(fragment: String, block: () -> Unit) {
        try {
            block()
            fail("expected a BundleError mentioning '$fragment'")
        } catch (e: BundleError) {
            val msg = e.message ?: ""
            assertTrue(msg, msg.contains(fragment))
            assertEquals("one line", 1, msg.lines().size)
        }
    }

    private fun manifestText(): String = File(Golden.dir, "manifest.json").readText()

    @Test
    fun wrongSchemaVersion() = expectError("schema_version") {
        BundleManifest.parse(manifestText().replace("\"schema_version\": 1", "\"schema_version\": 99"))
    }

    @Test
    fun missingField() = expectError("shapes.max_context") {
        BundleManifest.parse(manifestText().replace("\"max_context\"", "\"max_context_renamed\""))
    }

    @Test
    fun decoderPartsChainInLayerOrder() {
        // the golden bundle's decoder is lowered in parts of one layer (tests/conftest.py)
        val parts = BundleManifest.parse(manifestText()).component(BundleManifest.COMPONENT_DECODER).programs
        assertEquals(listOf(0, 1), parts.map { it.firstLayer })
        assertEquals(listOf(1, 2), parts.map { it.endLayer })
    }

    @Test
    fun decoderPartsWithAGap() = expectError("components.text_decoder.programs[1].layers") {
        BundleManifest.parse(manifestText().replaceFirst(Regex("\"layers\": \\[\\s*1,"), "\"layers\": [3,"))
    }

    @Test
    fun externalWeightsAreRefused() = expectError("components.text_decoder.programs[1].data_file") {
        // the second part of the golden bundle's decoder, as lowering.external_weights writes it
        BundleManifest.parse(manifestText().replaceFirst("\"file\": \"text_decoder.01-01.pte\"",
            "\"data_file\": \"text_decoder.01-01.ptd\", \"file\": \"text_decoder.01-01.pte\""))
    }

    @Test
    fun notJson() = expectError("valid JSON") { BundleManifest.parse("{ nope") }

    @Test
    fun tamperedFileIsRefused() {
        val dir = tmp.newFolder("bundle")
        File(Golden.dir, "manifest.json").copyTo(File(dir, "manifest.json"))
        val manifest = BundleManifest.parse(manifestText())
        for (name in manifest.files.keys) File(dir, name).writeText("short")
        expectError("bytes") { BundleManifest.load(dir) } // a truncated push
        for (name in manifest.files.keys) File(dir, name).writeBytes(ByteArray(manifest.files.getValue(name).bytes.toInt()))
        expectError("sha256") { BundleManifest.load(dir) } // right size, wrong content
        for (name in manifest.files.keys) File(Golden.dir, name).copyTo(File(dir, name), overwrite = true)
        assertEquals(manifest.files.keys, BundleManifest.load(dir).files.keys) // the real files pass
    }

    /** The golden bundle copied into a fresh directory with its manifest text edited by [edit]. */
    private fun bundleWith(edit: (String) -> String): File {
        val dir = tmp.newFolder("edited")
        for (name in BundleManifest.parse(manifestText()).files.keys) File(Golden.dir, name).copyTo(File(dir, name))
        File(dir, "manifest.json").writeText(edit(manifestText()))
        return dir
    }

    @Test
    fun programOutsideTheBundleIsRefused() = expectError("inside the bundle") {
        val dir = bundleWith { it.replaceFirst("\"file\": \"text_decoder.01-01.pte\"", "\"file\": \"../evil.pte\"") }
        File(dir, "text_decoder.01-01.pte").copyTo(File(dir.parentFile, "evil.pte"))
        BundleManifest.load(dir)
    }

    @Test
    fun programTheManifestDoesNotHashIsRefused() = expectError("sha256 of text_decoder.01-01.pte") {
        // the file stays, but its entry (and so its hash) is gone from files
        BundleManifest.load(bundleWith { it.replaceFirst(Regex("\"text_decoder.01-01.pte\": \\{[^}]*\\},?"), "") })
    }

    @Test
    fun tokenizerOfAnotherKindIsRefused() = expectError("model.type") {
        ByteLevelBpe.parse("{\"model\": {\"type\": \"Unigram\", \"vocab\": []}}")
    }
}
