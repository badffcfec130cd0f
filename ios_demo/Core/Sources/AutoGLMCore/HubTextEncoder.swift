import Foundation
import Tokenizers

/// The bundle's tokenizer.json through swift-transformers (Hugging Face's maintained Swift
/// tokenizers). The bundle carries no tokenizer_config.json, so the class is named here.
public struct HubTextEncoder: TextEncoder {
    public let tokenizer: Tokenizer
    /// The same tokenizer without its special added tokens, for user text: "<|user|>" typed in a
    /// prompt is text, not a turn (the host's encode_special_tokens); ChatPrompt inserts special ids.
    let textTokenizer: Tokenizer

    public init(bundle: URL) throws {
        let data = try Data(contentsOf: bundle.appendingPathComponent("tokenizer.json"))
        guard let dict = try JSONSerialization.jsonObject(with: data) as? [NSString: Any] else {
            throw BundleError(file: "tokenizer.json", field: nil, expected: "a JSON object", got: nil, fix: JsonNode.reexport)
        }
        let config = Config(["tokenizer_class": "PreTrainedTokenizerFast"] as [NSString: Any])
        tokenizer = try AutoTokenizer.from(tokenizerConfig: config, tokenizerData: Config(dict))
        var plain = dict
        if let added = dict["added_tokens" as NSString] as? [[String: Any]] {
            plain["added_tokens" as NSString] = added.filter { ($0["special"] as? Bool) != true }
        }
        textTokenizer = try AutoTokenizer.from(tokenizerConfig: config, tokenizerData: Config(plain))
    }

    public func encodeText(_ text: String) -> [Int] {
        textTokenizer.encode(text: text, addSpecialTokens: false)
    }

    public func decode(_ ids: [Int]) -> String {
        tokenizer.decode(tokens: ids, skipSpecialTokens: true)
    }
}
