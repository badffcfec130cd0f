import Foundation
import XCTest
@testable import AutoGLMCore

/// Sampling, stop strings' hold-back and the reasoning split, as the Kotlin core's
/// SamplingAndStopsTest checks them (draws in distribution: the random source is not torch's).
final class SamplingTests: XCTestCase {
    func frequencies(_ s: Sampling, _ logits: [Float], _ n: Int) -> [Double] {
        var counts = [Double](repeating: 0, count: logits.count)
        for _ in 0..<n { counts[s.choose(logits, [])] += 1 }
        return counts.map { $0 / Double(n) }
    }

    func testTemperatureZeroAndTopKOneAreGreedy() {
        let logits: [Float] = [0.1, 2, 1.9, -1]
        XCTAssertEqual(Sampling().choose(logits, []), 1)
        for _ in 0..<50 { XCTAssertEqual(Sampling(temperature: 5, topK: 1).choose(logits, []), 1) }
        XCTAssertEqual(Sampling(penalties: Penalties(frequency: 0.2)).choose(logits, [1]), 2)
    }

    func testDrawsFollowTheSoftmaxAtTheTemperature() {
        let logits: [Float] = [0, Float(log(3.0))]
        XCTAssertEqual(frequencies(Sampling(temperature: 1, seed: 1), logits, 8000)[1], 0.75, accuracy: 0.02)
    }

    func testTopPKeepsTheSmallestHeadReachingItsMass() {
        let logits: [Float] = [Float(log(1.0)), Float(log(6.0)), Float(log(3.0))]
        XCTAssertEqual(frequencies(Sampling(temperature: 1, topP: 0.5, seed: 3), logits, 500), [0, 1, 0])
        let f = frequencies(Sampling(temperature: 1, topP: 0.7, seed: 4), logits, 6000)
        XCTAssertEqual(f[0], 0)
        XCTAssertEqual(f[1], 2.0 / 3, accuracy: 0.02)
    }

    func testASeedRepeatsItsDraws() {
        let logits = (0..<50).map { Float($0 % 7) * 0.3 }
        let draw = { (seed: UInt64) -> [Int] in
            let s = Sampling(temperature: 1, seed: seed)
            return (0..<40).map { _ in s.choose(logits, []) }
        }
        XCTAssertEqual(draw(42), draw(42))
        XCTAssertNotEqual(draw(42), draw(43))
    }

    func testHoldBackKeepsWhatAStopStringMayStillTakeBack() {
        XCTAssertEqual(AnswerText.holdBack("tap then fin", ["finish("]), "tap then ")
        XCTAssertEqual(AnswerText.holdBack("tap", ["finish("]), "tap")
    }

    func testReasoningIsSplitFromTheAnswer() {
        XCTAssertTrue(Reasoning.split("<think>look</think>do(action=\"Tap\")") == ("look", "do(action=\"Tap\")"))
        XCTAssertTrue(Reasoning.split("plain") == ("", "plain"))
        XCTAssertTrue(Reasoning.split("\n<think>still") == ("still", ""))
    }
}
