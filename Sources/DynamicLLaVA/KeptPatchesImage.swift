// `generate --kept-patches`: the image tokens a request kept, drawn over the image the vision tower saw.
import Foundation
import Imaging

extension LLaVAPipeline {
    /// The preprocessed square (before normalising) of the image at `url`, `S` x `S` pixels, with the patches not in
    /// `keptImageIndices` darkened (`KeptPatches.overlay`); every patch kept when nil (no pruning).
    public func keptPatchesImage(imageAt url: URL, keptImageIndices: [Int]?) throws(InputError) -> RGBImage {
        let square: RGBImage
        do {
            square = preprocessor.croppedSquare(for: try decoder.decode(contentsOf: url))
        } catch {
            throw .image(error)
        }
        let grid = model.vision.configuration.patchesPerSide
        return KeptPatches.overlay(square, grid: grid, kept: keptImageIndices ?? Array(0 ..< grid * grid))
    }
}
