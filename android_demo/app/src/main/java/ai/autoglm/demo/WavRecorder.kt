package ai.autoglm.demo

import android.annotation.SuppressLint
import android.media.AudioFormat
import android.media.AudioRecord
import android.media.MediaRecorder

/** Records up to [samples] of 16-bit mono PCM at [sampleRate] Hz (the bundle's audio window). */
class WavRecorder(private val sampleRate: Int, private val samples: Int) {
    @Volatile private var stopped = false

    fun stop() {
        stopped = true
    }

    @SuppressLint("MissingPermission") // MainActivity asks for RECORD_AUDIO before calling this
    fun record(): FloatArray {
        val minBuf = AudioRecord.getMinBufferSize(sampleRate, AudioFormat.CHANNEL_IN_MONO, AudioFormat.ENCODING_PCM_16BIT)
        val rec = AudioRecord(MediaRecorder.AudioSource.MIC, sampleRate, AudioFormat.CHANNEL_IN_MONO,
            AudioFormat.ENCODING_PCM_16BIT, maxOf(minBuf, 4096))
        val pcm = ShortArray(samples)
        var n = 0
        stopped = false
        rec.startRecording()
        try {
            while (n < samples && !stopped) {
                val got = rec.read(pcm, n, minOf(4096, samples - n))
                if (got <= 0) break
                n += got
            }
        } finally {
            rec.stop()
            rec.release()
        }
        return FloatArray(n) { pcm[it] / 32768f }
    }
}
