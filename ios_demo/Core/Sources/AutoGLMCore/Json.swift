import Foundation

/// A bundle the app cannot use: one line naming the file, the field, what was expected and what to do.
public struct BundleError: Error, CustomStringConvertible {
    public let file: String
    public let field: String?
    public let expected: String?
    public let got: String?
    public let fix: String

    public var description: String {
        var s = file
        if let field { s += ": field '\(field)'" }
        if let expected { s += ": expected \(expected)" }
        if let got { s += ", got \(got)" }
        return s + "; fix: \(fix)"
    }
}

/// Typed access to a JSON object. Every manifest read goes through `req` / `opt` (and their typed
/// forms): the repository's contract test collects their keys and checks them against the
/// manifests the exporter writes.
public struct JsonNode {
    public let file: String
    public let path: String
    public let obj: [String: Any]

    static let reexport = "re-export the bundle with autoglm-export"

    public static func parse(_ data: Data, file: String) throws -> JsonNode {
        guard let any = try? JSONSerialization.jsonObject(with: data), let obj = any as? [String: Any] else {
            throw BundleError(file: file, field: nil, expected: "a JSON object", got: nil, fix: reexport)
        }
        return JsonNode(file: file, path: "", obj: obj)
    }

    func at(_ key: String) -> String { path.isEmpty ? key : "\(path).\(key)" }

    public func req(_ key: String) throws -> Any {
        guard let v = obj[key], !(v is NSNull) else {
            throw BundleError(file: file, field: at(key), expected: "a value", got: "nothing", fix: Self.reexport)
        }
        return v
    }

    public func opt(_ key: String) -> Any? {
        guard let v = obj[key], !(v is NSNull) else { return nil }
        return v
    }

    public func reqObj(_ key: String) throws -> JsonNode {
        guard let o = try req(key) as? [String: Any] else { throw wrong(key, "an object") }
        return JsonNode(file: file, path: at(key), obj: o)
    }

    public func optObj(_ key: String) throws -> JsonNode? {
        guard let v = opt(key) else { return nil }
        guard let o = v as? [String: Any] else { throw wrong(key, "an object") }
        return JsonNode(file: file, path: at(key), obj: o)
    }

    public func reqInt(_ key: String) throws -> Int {
        guard let n = try req(key) as? NSNumber else { throw wrong(key, "a number") }
        return n.intValue
    }

    public func reqDouble(_ key: String) throws -> Double {
        guard let n = try req(key) as? NSNumber else { throw wrong(key, "a number") }
        return n.doubleValue
    }

    public func reqString(_ key: String) throws -> String {
        guard let s = try req(key) as? String else { throw wrong(key, "a string") }
        return s
    }

    public func reqInts(_ key: String) throws -> [Int] {
        guard let a = try req(key) as? [NSNumber] else { throw wrong(key, "an array of numbers") }
        return a.map { $0.intValue }
    }

    public func reqDoubles(_ key: String) throws -> [Double] {
        guard let a = try req(key) as? [NSNumber] else { throw wrong(key, "an array of numbers") }
        return a.map { $0.doubleValue }
    }

    public func reqArray(_ key: String) throws -> [Any] {
        guard let a = try req(key) as? [Any] else { throw wrong(key, "an array") }
        return a
    }

    public func child(_ key: String, _ value: Any) throws -> JsonNode {
        guard let o = value as? [String: Any] else { throw wrong(key, "an object") }
        return JsonNode(file: file, path: at(key), obj: o)
    }

    func wrong(_ key: String, _ what: String) -> BundleError {
        BundleError(file: file, field: at(key), expected: what, got: obj[key].map { "\($0)".prefix(40) + "" }, fix: Self.reexport)
    }
}
