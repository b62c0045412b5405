// From a user's files to a GenerationRequest: the model's tokenizer and chat template (vicuna_v1),
// the image decoder and CLIP preprocessing, exactly as LLaVA-1.5's Python pipeline.
import Foundation
import Imaging
import Tokenizer

/// Why a request could not be built from user input; each case names the file.
public enum InputError: Error, CustomStringConvertible {
    case image(ImageError)
    case tokenizer(TokenizerError)

    public var description: String {
        switch self {
        case .image(let error): return error.description
        case .tokenizer(let error): return error.description
        }
    }

    /// 65 for a bad image (data), 78 for a model without a usable tokenizer (configuration),
    /// or the image's own code (66 when it cannot be read).
    public var exitCode: Int32 {
        switch self {
        case .image(let error): return error.exitCode
        case .tokenizer: return 78
        }
    }
}

/// A model with what turns images and questions into its inputs.
public struct LLaVAPipeline: Sendable {
    public let model: LLaVAModel
    public let tokenizer: SentencePieceTokenizer
    public let template: ConversationTemplate
    public let decoder: ImageDecoder
    public let preprocessor: CLIPImagePreprocessor

    public init(model: LLaVAModel, decoderOptions: ImageDecoder.Options = ImageDecoder.Options()) throws(InputError) {
        self.model = model
        do {
            tokenizer = try SentencePieceTokenizer.load(directory: model.directory)
        } catch {
            throw .tokenizer(error)
        }
        template = .vicunaV1
        decoder = ImageDecoder(options: decoderOptions)
        let settings = model.imagePreprocessing
        preprocessor = CLIPImagePreprocessor(resolution: model.vision.configuration.imageSize,
                                             mean: settings.mean ?? CLIPImagePreprocessor.openAICLIPMean,
                                             std: settings.std ?? CLIPImagePreprocessor.openAICLIPStd,
                                             padToSquare: settings.padToSquare)
    }

    /// The end-of-sequence id: config.json's `eos_token_id`, else the tokenizer's `</s>`.
    public var endOfSequenceTokenID: Int32 { model.endOfSequenceTokenID ?? tokenizer.eosTokenID }

    /// `[3, S, S]` pixel values of an image file (decode, pad to square, resize, crop, normalise).
    public func pixelValues(imageAt url: URL) throws(InputError) -> [Float] {
        do {
            return preprocessor.pixelValues(for: try decoder.decode(contentsOf: url))
        } catch {
            throw .image(error)
        }
    }

    /// `[3, S, S]` pixel values of an encoded image held in memory; `name` (its path) is used in errors.
    public func pixelValues(imageData data: Data, name: String) throws(InputError) -> [Float] {
        do {
            return preprocessor.pixelValues(for: try decoder.decode(data: data, name: name))
        } catch {
            throw .image(error)
        }
    }

    /// A request for `question` about the image at `url`, wrapped in the chat template.
    public func request(imageAt url: URL, question: String, parameters: GenerationParameters) throws(InputError) -> GenerationRequest {
        request(pixelValues: try pixelValues(imageAt: url), question: question, parameters: parameters)
    }

    /// A request for `question` about an image already read (`data`, the file's bytes; `name` its path for errors):
    /// the daemon decodes exactly the bytes whose sha256 it checked.
    public func request(imageData data: Data, name: String, question: String, parameters: GenerationParameters) throws(InputError) -> GenerationRequest {
        request(pixelValues: try pixelValues(imageData: data, name: name), question: question, parameters: parameters)
    }

    func request(pixelValues: [Float], question: String, parameters: GenerationParameters) -> GenerationRequest {
        let prompt = template.tokens(question: question, tokenizer: tokenizer)
        var parameters = parameters
        parameters.endOfSequence = endOfSequenceTokenID
        return GenerationRequest(idsBeforeImage: prompt.idsBeforeImage, pixelValues: pixelValues,
                                 idsAfterImage: prompt.idsAfterImage, parameters: parameters)
    }

    /// A generator whose results carry decoded text (and honour stop strings).
    public var generator: Generator {
        let tokenizer = tokenizer
        return Generator(model: model, detokenize: { tokenizer.decode($0) })
    }
}
