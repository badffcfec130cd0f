package ai.autoglm.demo

import ai.autoglm.demo.core.BundleError
import ai.autoglm.demo.core.BundleManifest
import ai.autoglm.demo.core.ByteLevelBpe
import ai.autoglm.demo.core.ChatSession
import ai.autoglm.demo.core.ImagePreprocessor
import ai.autoglm.demo.core.LogMel
import ai.autoglm.demo.core.Message
import ai.autoglm.demo.core.ModelRuntime
import ai.autoglm.demo.core.Part
import ai.autoglm.demo.core.TokenListener
import android.Manifest
import android.graphics.Bitmap
import android.graphics.ImageDecoder
import android.net.Uri
import android.os.Bundle
import android.widget.Button
import android.widget.EditText
import android.widget.ImageView
import android.widget.LinearLayout
import android.widget.ScrollView
import android.widget.TextView
import androidx.activity.ComponentActivity
import androidx.activity.result.contract.ActivityResultContracts
import java.io.File
import java.util.concurrent.Executors

/**
 * Pick or shoot an image, record a clip, type a question, watch the answer stream in; the next
 * question continues the conversation (earlier images leave the history, as the phone agent does,
 * and the cached prefix is not prefilled again); "New chat" starts over. Everything
 * model-specific (sizes, token ids, preprocessing, methods) is read from the bundle's manifest.
 * Push a bundle with: adb push BUNDLE/. /sdcard/Android/data/ai.autoglm.demo/files/bundle/
 */
class MainActivity : ComponentActivity() {
    private val worker = Executors.newSingleThreadExecutor()
    private lateinit var output: TextView
    private lateinit var preview: ImageView
    private var manifest: BundleManifest? = null
    private var tokenizer: ByteLevelBpe? = null
    private var runtime: ModelRuntime? = null
    private var image: Bitmap? = null
    private var audio: FloatArray? = null
    private var recorder: WavRecorder? = null
    private var session: ChatSession? = null
    private val history = ArrayList<Message>()  // earlier turns, text only

    private val pickImage = registerForActivityResult(ActivityResultContracts.GetContent()) { uri: Uri? ->
        if (uri != null) setImage(ImageDecoder.decodeBitmap(ImageDecoder.createSource(contentResolver, uri)))
    }
    private val shootImage = registerForActivityResult(ActivityResultContracts.TakePicturePreview()) { bmp: Bitmap? ->
        if (bmp != null) setImage(bmp)
    }
    private val askMic = registerForActivityResult(ActivityResultContracts.RequestPermission()) { granted ->
        if (granted) startRecording() else output.text = "microphone permission denied"
    }

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        val root = LinearLayout(this).apply { orientation = LinearLayout.VERTICAL; setPadding(24, 24, 24, 24) }
        val question = EditText(this).apply { hint = "Ask about the screen"; setText("What is on the screen?") }
        preview = ImageView(this).apply { adjustViewBounds = true; maxHeight = 600 }
        output = TextView(this).apply { textSize = 16f }
        val buttons = LinearLayout(this).apply { orientation = LinearLayout.HORIZONTAL }
        buttons.addView(Button(this).apply { text = "Pick image"; setOnClickListener { pickImage.launch("image/*") } })
        buttons.addView(Button(this).apply { text = "Camera"; setOnClickListener { shootImage.launch(null) } })
        buttons.addView(Button(this).apply { text = "Record"; setOnClickListener { toggleRecording(this) } })
        buttons.addView(Button(this).apply { text = "Ask"; setOnClickListener { ask(question.text.toString()) } })
        buttons.addView(Button(this).apply { text = "New chat"; setOnClickListener { worker.execute { history.clear() } } })
        root.addView(question)
        root.addView(buttons)
        root.addView(preview)
        root.addView(ScrollView(this).apply { addView(output) })
        setContentView(root)
        loadBundle()
    }

    private fun bundleDir(): File = File(getExternalFilesDir(null), "bundle")

    private fun loadBundle() {
        output.text = "checking the bundle in ${bundleDir()} ..."
        worker.execute {
            val status = try {
                val m = BundleManifest.load(bundleDir()) // sizes and SHA-256 of every file first
                if (!BundleManifest.TARGETS_FOR_ANDROID.contains(m.target)) {
                    throw BundleError("manifest.json", "target", BundleManifest.TARGETS_FOR_ANDROID.joinToString(" or "),
                        m.target, "export with --target xnnpack (any arm64 phone) or --target qnn (Snapdragon 8 Gen 3)")
                }
                manifest = m
                tokenizer = ByteLevelBpe.parse(File(bundleDir(), "tokenizer.json").readText())
                m.prompt.chatLayout(tokenizer!!)  // a bundle whose chat template has no pieces is refused before its programs load
                runtime = openRuntime(bundleDir(), m).also { session = ChatSession(it, m, tokenizer!!) }
                history.clear()
                "ready: ${m.target} bundle, context ${m.maxContext}" + (if (m.audio != null) ", audio" else "")
            } catch (e: BundleError) {
                e.message ?: "bad bundle"
            }
            runOnUiThread { output.text = status }
        }
    }

    private fun setImage(bmp: Bitmap) {
        image = bmp.copy(Bitmap.Config.ARGB_8888, false)
        preview.setImageBitmap(image)
    }

    private fun toggleRecording(button: Button) {
        val r = recorder
        if (r != null) {
            r.stop()
            button.text = "Record"
            return
        }
        if (manifest?.audio == null) {
            output.text = "this bundle has no audio encoder"
            return
        }
        button.text = "Stop"
        askMic.launch(Manifest.permission.RECORD_AUDIO)
    }

    private fun startRecording() {
        val cfg = manifest?.audio ?: return
        val r = WavRecorder(cfg.sampleRate, cfg.samples)
        recorder = r
        worker.execute {
            val clip = r.record()
            recorder = null
            audio = clip
            runOnUiThread { output.text = "recorded %.1f s".format(clip.size / cfg.sampleRate.toFloat()) }
        }
    }

    // ImageDecoder has already applied the EXIF orientation; transparency goes on white, as on the host
    private fun rgbOf(bmp: Bitmap): IntArray {
        val px = IntArray(bmp.width * bmp.height)
        bmp.getPixels(px, 0, bmp.width, 0, 0, bmp.width, bmp.height)
        return ImagePreprocessor.rgbOnWhite(px)
    }

    private fun ask(question: String) {
        val m = manifest ?: return
        val chat = session ?: return
        val bmp = image
        val clip = audio
        output.text = ""
        worker.execute {
            val parts = ArrayList<Part>()
            if (bmp != null) parts.add(Part.image(ImagePreprocessor.prepare(rgbOf(bmp), bmp.width, bmp.height, m.image)))
            if (clip != null && m.audio != null) parts.add(Part.audio(LogMel.compute(clip, m.audio!!)))
            parts.add(Part.text(question))
            val turn = try {
                chat.chat(history + Message("user", parts), 256, onText = { delta -> runOnUiThread { output.append(delta) } })
            } catch (e: IllegalArgumentException) { // the conversation outgrew the bundle's context
                history.clear()
                runOnUiThread { output.text = "${e.message}; starting a new chat" }
                return@execute
            }
            history.add(Message.text("user", question))
            history.add(Message.text("assistant", turn.text))
        }
    }

    override fun onDestroy() {
        worker.shutdown()
        (runtime as? ExecuTorchRuntime)?.close()
        super.onDestroy()
    }
}
