/// Which claimable jobs a claim takes: claim order (priority, run_at, id), except that jobs about the image of an
/// earlier job of the same priority, among the next `lookahead(limit)` claimable ones, move up behind it. A batch
/// then holds the questions about one image together, and the engine runs that image's vision tower and prompt
/// prefix once for all of them (its image-prefix cache). The lookahead is bounded so that a claim reads a bounded
/// stretch of the claim-order index, however long the queue.
public enum ClaimOrder {
    public struct Candidate: Sendable, Equatable {
        public var id: Int64
        public var priority: Int
        public var imageSHA256: String

        public init(id: Int64, priority: Int, imageSHA256: String) {
            self.id = id
            self.priority = priority
            self.imageSHA256 = imageSHA256
        }
    }

    /// Claimable jobs a claim of `limit` looks at.
    public static func lookahead(_ limit: Int) -> Int { limit * 32 }

    /// The ids of up to `limit` of `candidates` (given in claim order): groups of one priority and image, in the
    /// order of their first job, each in claim order.
    public static func choose(_ candidates: [Candidate], limit: Int) -> [Int64] {
        struct Group: Hashable { let priority: Int; let image: String }
        var order: [Group] = []
        var members: [Group: [Int64]] = [:]
        for candidate in candidates {
            let group = Group(priority: candidate.priority, image: candidate.imageSHA256)
            if members[group] == nil { order.append(group) }
            members[group, default: []].append(candidate.id)
        }
        return Array(order.lazy.flatMap { members[$0]! }.prefix(limit))
    }
}
