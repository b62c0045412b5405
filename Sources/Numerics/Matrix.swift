/// A dense row-major matrix of `Float`: the activation type of the whole engine.
///
/// Shape `[rows, columns]`; element `(r, c)` is `values[r * columns + c]`. Activations are always
/// f32 (weights may be stored narrower, see `WeightMatrix`).
public struct Matrix: Sendable, Equatable {
    public var rows: Int
    public var columns: Int
    public var values: [Float]

    public init(rows: Int, columns: Int, values: [Float]) {
        precondition(values.count == rows * columns, "Matrix: \(values.count) values for [\(rows), \(columns)]")
        self.rows = rows
        self.columns = columns
        self.values = values
    }

    public init(zeros rows: Int, _ columns: Int) {
        self.init(rows: rows, columns: columns, values: [Float](repeating: 0, count: rows * columns))
    }

    /// Row `r` as a new array.
    public func row(_ r: Int) -> [Float] {
        Array(values[r * columns ..< (r + 1) * columns])
    }

    /// The rows `range` as a new matrix.
    public func rows(_ range: Range<Int>) -> Matrix {
        Matrix(rows: range.count, columns: columns, values: Array(values[range.lowerBound * columns ..< range.upperBound * columns]))
    }

    /// The rows at `indices`, in that order.
    public func gatherRows(_ indices: [Int]) -> Matrix {
        var result = [Float]()
        result.reserveCapacity(indices.count * columns)
        for r in indices { result.append(contentsOf: values[r * columns ..< (r + 1) * columns]) }
        return Matrix(rows: indices.count, columns: columns, values: result)
    }

    /// Stacks matrices with equal column counts vertically.
    public static func concatenateRows(_ parts: [Matrix]) -> Matrix {
        guard let first = parts.first else { return Matrix(zeros: 0, 0) }
        var result = [Float]()
        result.reserveCapacity(parts.reduce(0) { $0 + $1.values.count })
        for part in parts {
            precondition(part.columns == first.columns, "concatenateRows: column counts differ")
            result.append(contentsOf: part.values)
        }
        return Matrix(rows: parts.reduce(0) { $0 + $1.rows }, columns: first.columns, values: result)
    }

    public static func += (lhs: inout Matrix, rhs: Matrix) {
        precondition(lhs.rows == rhs.rows && lhs.columns == rhs.columns, "+=: shapes differ")
        lhs.values.withUnsafeMutableBufferPointer { l in
            rhs.values.withUnsafeBufferPointer { r in
                for i in 0..<l.count { l[i] += r[i] }
            }
        }
    }
}
