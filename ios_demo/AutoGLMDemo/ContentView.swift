import AutoGLMCore
import PhotosUI
import SwiftUI

/// Pick a screenshot, record a question or type one, watch the answer stream in; the next question
/// continues the conversation (earlier images leave the history, as the phone agent does, and the
/// cached prefix is not prefilled again); "New chat" starts over. The bundle is
/// read from the app's Documents/bundle folder (copy it there with Finder); every size, token id
/// and method comes from its manifest.
@MainActor
final class DemoModel: ObservableObject {
    @Published var status = "loading the bundle ..."
    @Published var answer = ""
    @Published var recording = false
    var manifest: BundleManifest?
    var runtime: CoreMLRuntime?
    var tokenizer: HubTextEncoder?
    var image: (rgb: [UInt8], width: Int, height: Int)?
    var audio: [Float]?
    var recorder: AudioRecorder?
    var session: ChatSession?
    var history: [Message] = []  // earlier turns, text only

    var bundleDir: URL {
        FileManager.default.urls(for: .documentDirectory, in: .userDomainMask)[0].appendingPathComponent("bundle")
    }

    func load() {
        do {
            let m = try BundleManifest.load(bundleDir) // sizes and SHA-256 of every file first
            guard m.target == "coreml" else {
                throw BundleError(file: "manifest.json", field: "target", expected: "coreml", got: m.target,
                                  fix: "export with autoglm-export --target coreml")
            }
            manifest = m
            tokenizer = try HubTextEncoder(bundle: bundleDir)
            _ = try m.prompt.chatLayout(tokenizer!)  // a bundle whose chat template has no pieces is refused before its models load
            let rt = CoreMLRuntime(dir: bundleDir, manifest: m)
            runtime = rt
            session = ChatSession(runtime: rt, manifest: m, tokenizer: tokenizer!)
            history = []
            status = "ready: context \(m.maxContext)" + (m.audio != nil ? ", audio" : "")
        } catch {
            status = "\(error)"
        }
    }

    func setImage(_ picked: UIImage) {
        // drawn upright (a photo's EXIF orientation applied, as transformers' load_image does) onto
        // white (transparency composited as its image processors do)
        let format = UIGraphicsImageRendererFormat()
        format.scale = 1
        format.opaque = true
        let ui = UIGraphicsImageRenderer(size: picked.size, format: format).image { c in
            UIColor.white.setFill()
            c.fill(CGRect(origin: .zero, size: picked.size))
            picked.draw(at: .zero)
        }
        guard let cg = ui.cgImage else { return }
        let w = cg.width, h = cg.height
        var rgba = [UInt8](repeating: 0, count: w * h * 4)
        let ctx = CGContext(data: &rgba, width: w, height: h, bitsPerComponent: 8, bytesPerRow: w * 4,
                            space: CGColorSpace(name: CGColorSpace.sRGB)!, bitmapInfo: CGImageAlphaInfo.noneSkipLast.rawValue)!
        ctx.draw(cg, in: CGRect(x: 0, y: 0, width: w, height: h))
        var rgb = [UInt8](repeating: 0, count: w * h * 3)
        for i in 0..<(w * h) { for c in 0..<3 { rgb[3 * i + c] = rgba[4 * i + c] } }
        image = (rgb, w, h)
    }

    func toggleRecording() {
        guard let cfg = manifest?.audio else { status = "this bundle has no audio encoder"; return }
        if let r = recorder {
            audio = r.stop()
            recorder = nil
            recording = false
            status = String(format: "recorded %.1f s", Double(audio!.count) / Double(cfg.sampleRate))
            return
        }
        let r = AudioRecorder(sampleRate: cfg.sampleRate, maxSamples: cfg.samples)
        do {
            try r.start()
            recorder = r
            recording = true
        } catch {
            status = "\(error)"
        }
    }

    func ask(_ question: String) {
        guard let m = manifest, let chat = session else { return }
        answer = ""
        let img = image, clip = audio, earlier = history
        Task.detached {
            do {
                var parts: [Part] = []
                if let i = img { parts.append(.image(ImagePreprocessor.prepare(rgb: i.rgb, width: i.width, height: i.height, config: m.image))) }
                if let c = clip, let cfg = m.audio { parts.append(.audio(try LogMel.compute(c, cfg))) }
                parts.append(.text(question))
                let turn = try chat.chat(earlier + [Message(role: "user", parts: parts)], maxTokens: 256, onText: { delta in
                    Task { @MainActor in self.answer += delta }
                })
                let reply = turn.text
                Task { @MainActor in self.history += [.text("user", question), .text("assistant", reply)] }
            } catch {  // e.g. the conversation outgrew the bundle's context
                Task { @MainActor in
                    self.history = []
                    self.status = "\(error); starting a new chat"
                }
            }
        }
    }

    func newChat() { history = [] }
}

struct ContentView: View {
    @StateObject var model = DemoModel()
    @State var question = "What is on the screen?"
    @State var pick: PhotosPickerItem?
    @State var preview: UIImage?

    var body: some View {
        VStack(alignment: .leading, spacing: 12) {
            Text(model.status).font(.footnote).foregroundStyle(.secondary)
            if let preview { Image(uiImage: preview).resizable().scaledToFit().frame(maxHeight: 240) }
            HStack {
                PhotosPicker("Pick image", selection: $pick, matching: .images)
                Button(model.recording ? "Stop" : "Record") { model.toggleRecording() }
                Button("Ask") { model.ask(question) }
                Button("New chat") { model.newChat() }
            }
            TextField("Question", text: $question).textFieldStyle(.roundedBorder)
            ScrollView { Text(model.answer).frame(maxWidth: .infinity, alignment: .leading) }
        }
        .padding()
        .task { model.load() }
        .onChange(of: pick) { _, item in
            Task {
                if let data = try? await item?.loadTransferable(type: Data.self), let ui = UIImage(data: data) {
                    preview = ui
                    model.setImage(ui)
                }
            }
        }
    }
}
