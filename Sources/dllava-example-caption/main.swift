// The DynamicLLaVA library's smallest use: caption one image, greedily, with the model's own sparsity
// (Dynamic-LLaVA when the checkpoint has its predictors). Prints the caption; on failure one sentence on
// stderr and the exit code `dllava generate` gives for the same error (64 for wrong arguments).
//   swift run dllava-example-caption Jobs/models/dllava-scenes Jobs/samples/test_000000.png ["Describe the image."]
import DynamicLLaVA
import Foundation
import Numerics
import SafeTensors

let arguments = CommandLine.arguments
guard arguments.count == 3 || arguments.count == 4 else {
    FileHandle.standardError.write(Data("usage: dllava-example-caption MODEL_DIR IMAGE [QUESTION]\n".utf8))
    exit(64)
}
do {
    Parallelism.setThreads(ProcessInfo.processInfo.activeProcessorCount)
    let pipeline = try LLaVAPipeline(model: try LLaVAModel.load(directory: URL(fileURLWithPath: arguments[1])))
    let generator = pipeline.generator
    let parameters = GenerationParameters(maxTokens: 64, sparsity: SparsityParameters(mode: generator.defaultSparsityMode))
    let question = arguments.count == 4 ? arguments[3] : "Describe the image."
    let request = try pipeline.request(imageAt: URL(fileURLWithPath: arguments[2]), question: question, parameters: parameters)
    print(try generator.generate([request])[0].text)
} catch {
    FileHandle.standardError.write(Data("dllava-example-caption: \(error)\n".utf8))
    exit((error as? CheckpointError)?.exitCode ?? (error as? InputError)?.exitCode ?? (error as? GenerationError)?.exitCode ?? 1)
}
