import Foundation
import Tokenizers

/// The bundle's tokenizer.json through swift-transformers (Hugging Face's maintained Swift
/// tokenizers). The bundle carries no tokenizer_config.json, so the class is named here.
public struct HubTextEncoder: TextEncoder {
    public let tokenizer: Tokenizer

    public init(bundle: URL) throws {
        let data = try Data(contentsOf: bundle.appendingPathComponent("tokenizer.json"))
        guard let dict = try JSONSerialization.jsonObject(with: data) as? [NSString: Any] else {
            throw BundleError(file: "tokenizer.json", field: nil, expected: "a JSON object", got: nil, fix: JsonNode.reexport)
        }
        let config = Config(["tokenizer_class": "PreTrainedTokenizerFast"] as [NSString: Any])
        tokenizer = try AutoTokenizer.from(tokenizerConfig: config, tokenizerData: Config(dict))
    }

    public func encodeText(_ text: String) -> [Int] {
        tokenizer.encode(text: text, addSpecialTokens: false)
    }

    public func decode(_ ids: [Int]) -> String {
        tokenizer.decode(tokens: ids, skipSpecialTokens: true)
    }
}
