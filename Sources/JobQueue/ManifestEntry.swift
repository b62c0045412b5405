import Foundation

/// A reason a single manifest line is rejected.
struct ManifestLineError: Error {
    var reason: String
    init(_ reason: String) { self.reason = reason }
}

/// One manifest line, decoded but not yet checked against the file system.
struct ManifestEntry {
    var customID: String?
    var image: String
    var prompt: String
    var parameters: JobParameters
    var priority: Int?

    static let fields: Set<String> = Set(JobParameters.CodingKeys.allCases.map(\.stringValue) + ["custom_id", "image", "prompt", "priority"])

    init(customID: String?, image: String, prompt: String, parameters: JobParameters, priority: Int?) {
        self.customID = customID
        self.image = image
        self.prompt = prompt
        self.parameters = parameters
        self.priority = priority
    }

    /// From a CSV record: empty cells are absent; the rest decode as the same JSON object's strings would, through
    /// the one parameter schema (`JobParameters.textValuesKey` parses numbers from their text).
    init(csvFields cells: [String: String]) throws {
        let given = cells.filter { !$0.value.isEmpty }
        // Strings always encode.
        let object = try! JSONEncoder().encode(given)
        let decoder = JSONDecoder()
        decoder.userInfo[JobParameters.textValuesKey] = true
        do {
            self = try decoder.decode(ManifestEntry.self, from: object)
        } catch let error as ManifestLineError {
            throw error
        } catch {
            throw ManifestLineError("the row cannot be read: \(error)")
        }
    }
}

extension ManifestEntry: Decodable {
    struct Key: CodingKey {
        var stringValue: String
        var intValue: Int? { nil }
        init(_ name: String) { stringValue = name }
        init?(stringValue: String) { self.stringValue = stringValue }
        init?(intValue: Int) { nil }
    }

    init(from decoder: Decoder) throws {
        let container = try decoder.container(keyedBy: Key.self)
        for key in container.allKeys where !Self.fields.contains(key.stringValue) {
            throw ManifestLineError("unknown field '\(key.stringValue)'")
        }
        let text = decoder.userInfo[JobParameters.textValuesKey] as? Bool == true
        func string(_ name: String) throws -> String? {
            let key = Key(name)
            guard container.contains(key), !(try container.decodeNil(forKey: key)) else { return nil }
            do { return try container.decode(String.self, forKey: key) } catch { throw ManifestLineError("\(name) must be a string") }
        }
        guard let image = try string("image") else { throw ManifestLineError("no image") }
        guard let prompt = try string("prompt") else { throw ManifestLineError("no prompt") }
        var priority: Int?
        let priorityKey = Key("priority")
        if container.contains(priorityKey), !(try container.decodeNil(forKey: priorityKey)) {
            if text {
                let cell = try container.decode(String.self, forKey: priorityKey)
                guard let value = Int(cell.trimmingCharacters(in: .whitespaces)) else { throw ManifestLineError("priority must be an integer, not '\(cell)'") }
                priority = value
            } else {
                do { priority = try container.decode(Int.self, forKey: priorityKey) } catch { throw ManifestLineError("priority must be an integer") }
            }
        }
        let parameters: JobParameters
        do { parameters = try JobParameters(from: decoder) } catch let error as JobParameters.FieldError { throw ManifestLineError(error.reason) }
        self.init(customID: try string("custom_id"), image: image, prompt: prompt, parameters: parameters, priority: priority)
    }
}
