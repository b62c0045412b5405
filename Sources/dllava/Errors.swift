import DynamicLLaVA
import Imaging
import Numerics
import SafeTensors
import Tokenizer

/// The one-sentence message and exit code for an error from the libraries.
func describe(_ error: Error) -> (String, Int32) {
    switch error {
    case let error as CheckpointError: return (error.description, error.exitCode)
    case let error as GenerationError: return (error.description, error.exitCode)
    case let error as InputError: return (error.description, error.exitCode)
    case let error as ImageError: return (error.description, error.exitCode)
    case let error as TokenizerError: return (error.description, 78)
    case let error as KernelError: return (error.description, 78)
    default: return ("\(error)", 1)
    }
}
