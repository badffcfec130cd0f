import AVFoundation
import Foundation

/// Records the microphone as 16 kHz mono float samples (the bundle's audio window) with AVAudioEngine.
final class AudioRecorder {
    let engine = AVAudioEngine()
    var samples: [Float] = []
    let sampleRate: Double
    let maxSamples: Int

    init(sampleRate: Int, maxSamples: Int) {
        self.sampleRate = Double(sampleRate)
        self.maxSamples = maxSamples
    }

    func start() throws {
        let session = AVAudioSession.sharedInstance()
        try session.setCategory(.record, mode: .measurement)
        try session.setActive(true)
        let input = engine.inputNode
        let hw = input.outputFormat(forBus: 0)
        let target = AVAudioFormat(commonFormat: .pcmFormatFloat32, sampleRate: sampleRate, channels: 1, interleaved: false)!
        let converter = AVAudioConverter(from: hw, to: target)!
        samples = []
        input.installTap(onBus: 0, bufferSize: 4096, format: hw) { [weak self] buffer, _ in
            guard let self else { return }
            let capacity = AVAudioFrameCount(Double(buffer.frameLength) * self.sampleRate / hw.sampleRate) + 1
            guard let out = AVAudioPCMBuffer(pcmFormat: target, frameCapacity: capacity) else { return }
            var fed = false
            converter.convert(to: out, error: nil) { _, status in
                if fed { status.pointee = .noDataNow; return nil }
                fed = true
                status.pointee = .haveData
                return buffer
            }
            let ptr = out.floatChannelData![0]
            let room = self.maxSamples - self.samples.count
            self.samples += UnsafeBufferPointer(start: ptr, count: min(Int(out.frameLength), max(room, 0)))
        }
        try engine.start()
    }

    func stop() -> [Float] {
        engine.inputNode.removeTap(onBus: 0)
        engine.stop()
        return samples
    }
}
