import SwiftUI

@main
struct AutoGLMDemoApp: App {
    var body: some Scene {
        WindowGroup { ContentView() }
    }
}
