import DynamicLLaVA
import SafeTensors

/// The one-sentence message and exit code for an error from the libraries.
func describe(_ error: Error) -> (String, Int32) {
    switch error {
    case let error as CheckpointError: return (error.description, error.exitCode)
    case let error as GenerationError: return (error.description, 65)
    default: return ("\(error)", 1)
    }
}
