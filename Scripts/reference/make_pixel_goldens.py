#!/usr/bin/env python3
"""Writes the pixel-parity goldens for the Imaging target.

Reference pipeline = LLaVA-1.5 with image_aspect_ratio "pad":
  Image.open(path).convert("RGB") -> expand2square(img, (122, 116, 104))
  -> CLIPImageProcessor (slow, Pillow path) configured as openai/clip-vit-large-patch14-336.

Outputs, under Tests/ImagingTests/Fixtures/pixels/ (see Scripts/reference/README-imaging.md):
  <stem>.png         the 336x336 uint8 RGB image the processor produces before rescale/normalise
  goldens.json       per image: decoded size, sha256 of the decoded RGB bytes (HWC, before padding),
                     sha256 of the processor's float32 pixel_values [3,336,336] (C order)
  synthetic/*.png    small PNGs covering bit depths/colour types Pillow cannot write, with the
                     sha256 of Pillow's .convert("RGB") bytes in synthetic.json

Usage: /work/venv/bin/python Scripts/reference/make_pixel_goldens.py [images_dir]   (default Tests/Fixtures/images)
Nothing is downloaded: the processor is built from its arguments.
"""
import hashlib
import json
import os
import struct
import sys
import zlib

import numpy as np
import PIL
import transformers
from PIL import Image, ImageOps, features
from transformers import CLIPImageProcessor

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IMAGES = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "Tests", "Fixtures", "images")
OUT = os.path.join(ROOT, "Tests", "ImagingTests", "Fixtures", "pixels")

MEAN = [0.48145466, 0.4578275, 0.40821073]  # OPENAI_CLIP_MEAN
STD = [0.26862954, 0.26130258, 0.27577711]  # OPENAI_CLIP_STD


def expand2square(pil_img, background_color):
    # Verbatim from LLaVA (llava/mm_utils.py).
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


def processor(**overrides):
    # The preprocessor_config.json of openai/clip-vit-large-patch14-336, spelled out.
    args = dict(
        do_resize=True, size={"shortest_edge": 336}, resample=3,
        do_center_crop=True, crop_size={"height": 336, "width": 336},
        do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=MEAN, image_std=STD,
        do_convert_rgb=True,
    )
    args.update(overrides)
    return CLIPImageProcessor(**args)  # the slow (Pillow) class, as LLaVA uses


def sha(a):
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def normalise(u8_chw):
    # transformers' rescale (float64 multiply, cast to float32) then normalize (float32).
    x = (u8_chw.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.array(MEAN, dtype=np.float32)[:, None, None]
    std = np.array(STD, dtype=np.float32)[:, None, None]
    return (x - mean) / std


def png_chunk(kind, data):
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)


def write_png(path, depth, colour_type, values, plte=None, trns=None, interlace=False, exif=None):
    """Minimal PNG writer (filter 0 rows, optional Adam7) for the cases Pillow cannot save.
    values: integer array [height, width, channels]."""
    height, width, _ = values.shape

    def pack(rows):
        out = b""
        for r in rows:
            flat = r.reshape(-1)
            if depth < 8:
                out += b"\x00" + pack_bits(flat, depth)
            elif depth == 8:
                out += b"\x00" + flat.astype(np.uint8).tobytes()
            else:
                out += b"\x00" + flat.astype(">u2").tobytes()
        return out

    if interlace:
        raw = b""
        for x0, y0, dx, dy in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)):
            sub = values[y0::dy, x0::dx]
            if sub.shape[0] and sub.shape[1]:
                raw += pack(sub)
    else:
        raw = pack(values)
    data = b"\x89PNG\r\n\x1a\n"
    data += png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 1 if interlace else 0))
    if plte is not None:
        data += png_chunk(b"PLTE", plte)
    if trns is not None:
        data += png_chunk(b"tRNS", trns)
    if exif is not None:
        data += png_chunk(b"eXIf", exif)
    data += png_chunk(b"IDAT", zlib.compress(raw, 9))
    data += png_chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(data)


def pack_bits(values, bits):
    out, acc, n = bytearray(), 0, 0
    for v in values:
        acc = (acc << bits) | int(v)
        n += bits
        if n == 8:
            out.append(acc)
            acc, n = 0, 0
    if n:
        out.append(acc << (8 - n))
    return bytes(out)


def write_ycck_jpeg(path, cmyk):
    """A YCCK JPEG (Adobe transform 2), which Pillow cannot write: compressed from CMYK pixels by
    the system's libturbojpeg through ctypes (TurboJPEG turns CMYK input into YCCK)."""
    import ctypes
    import ctypes.util
    tj = ctypes.CDLL(ctypes.util.find_library("turbojpeg") or "libturbojpeg.so.0")
    tj.tjInitCompress.restype = ctypes.c_void_p
    tj.tjCompress2.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                               ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_ulong), ctypes.c_int, ctypes.c_int, ctypes.c_int]
    tj.tjFree.argtypes = [ctypes.c_void_p]
    tj.tjDestroy.argtypes = [ctypes.c_void_p]
    handle = tj.tjInitCompress()
    height, width, _ = cmyk.shape
    out, size = ctypes.c_void_p(), ctypes.c_ulong(0)
    TJPF_CMYK, TJSAMP_420 = 11, 2
    status = tj.tjCompress2(handle, cmyk.astype(np.uint8).tobytes(), width, 0, height, TJPF_CMYK,
                            ctypes.byref(out), ctypes.byref(size), TJSAMP_420, 90, 0)
    assert status == 0, "tjCompress2 failed"
    with open(path, "wb") as f:
        f.write(ctypes.string_at(out, size.value))
    tj.tjFree(out)
    tj.tjDestroy(handle)


def synthetic(outdir):
    """Small PNGs for every colour type / bit depth, and a YCCK JPEG; expected = Pillow's convert("RGB")."""
    os.makedirs(outdir, exist_ok=True)
    rng = np.random.default_rng(3)
    w, h = 7, 5
    cases = {}

    def rand(bits, channels, width=w, height=h):
        return rng.integers(0, 1 << bits, size=(height, width, channels))

    for bits in (1, 2, 4, 8):
        write_png(f"{outdir}/gray{bits}.png", bits, 0, rand(bits, 1))
    g16 = rand(16, 1); g16[0, :3, 0] = [0, 255, 256]
    write_png(f"{outdir}/gray16.png", 16, 0, g16)
    write_png(f"{outdir}/gray8_trns.png", 8, 0, rand(8, 1), trns=b"\x00\x10")
    write_png(f"{outdir}/rgb8.png", 8, 2, rand(8, 3))
    write_png(f"{outdir}/rgb16.png", 16, 2, rand(16, 3))
    write_png(f"{outdir}/gray_alpha8.png", 8, 4, rand(8, 2))
    write_png(f"{outdir}/gray_alpha16.png", 16, 4, rand(16, 2))
    write_png(f"{outdir}/rgba8.png", 8, 6, rand(8, 4))
    write_png(f"{outdir}/rgba16.png", 16, 6, rand(16, 4))
    for bits in (1, 2, 4, 8):
        n = 1 << bits
        plte = rng.integers(0, 256, size=3 * n).astype(np.uint8).tobytes()
        trns = bytes(rng.integers(0, 256, size=max(1, n // 2)).astype(np.uint8)) if bits in (2, 8) else None
        write_png(f"{outdir}/palette{bits}.png", bits, 3, rand(bits, 1), plte=plte, trns=trns)
    # Adam7 interlacing, including sub-byte samples and passes that are empty for small images.
    write_png(f"{outdir}/interlaced_gray4.png", 4, 0, rand(4, 1, 11, 9), interlace=True)
    write_png(f"{outdir}/interlaced_rgb16.png", 16, 2, rand(16, 3, 10, 13), interlace=True)
    plte = rng.integers(0, 256, size=3 * 4).astype(np.uint8).tobytes()
    write_png(f"{outdir}/interlaced_palette2.png", 2, 3, rand(2, 1, 3, 2), plte=plte, interlace=True)
    # EXIF orientation in a PNG eXIf chunk (big-endian TIFF, orientation 8 = rotate 90 anticlockwise).
    exif = b"MM\x00\x2a\x00\x00\x00\x08" + b"\x00\x01" + b"\x01\x12\x00\x03\x00\x00\x00\x01\x00\x08\x00\x00" + b"\x00\x00\x00\x00"
    write_png(f"{outdir}/rgb8_exif_orientation8.png", 8, 2, rand(8, 3), exif=exif)
    # Smooth CMYK content so the JPEG is not all noise.
    yy, xx = np.mgrid[0:24, 0:32]
    cmyk = np.stack([xx * 8, yy * 10, (xx + yy) * 4, (xx * yy) % 256], axis=-1) % 256
    write_ycck_jpeg(f"{outdir}/ycck.jpg", cmyk)
    for name in sorted(os.listdir(outdir)):
        with Image.open(os.path.join(outdir, name)) as im:
            rgb = np.asarray(im.convert("RGB"))
            info = {"mode": im.mode, "width": im.size[0], "height": im.size[1], "rgb_sha256": sha(rgb),
                    "rgb_hex": rgb.tobytes().hex()}
            if name.endswith(".jpg"):
                info["adobe_transform"] = im.info.get("adobe_transform")
            orientation = im.getexif().get(0x0112)
            if orientation not in (None, 1):
                transposed = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
                info["exif_orientation"] = orientation
                info["exif_transposed"] = {"width": transposed.shape[1], "height": transposed.shape[0],
                                           "rgb_hex": transposed.tobytes().hex()}
            cases[name] = info
    return cases


def main():
    os.makedirs(OUT, exist_ok=True)
    proc = processor()
    proc_u8 = processor(do_rescale=False, do_normalize=False)
    pad = tuple(int(x * 255) for x in proc.image_mean)
    assert pad == (122, 116, 104), pad
    images = {}
    for name in sorted(os.listdir(IMAGES)):
        if name.startswith("bad_") or not name.lower().endswith((".png", ".jpg", ".jpeg")):
            continue
        with Image.open(os.path.join(IMAGES, name)) as im:
            mode = im.mode
            rgb = im.convert("RGB")
            orientation = im.getexif().get(0x0112)
            transposed = np.asarray(ImageOps.exif_transpose(im).convert("RGB")) if orientation not in (None, 1) else None
        decoded = np.asarray(rgb)
        square = expand2square(rgb, pad)
        # channels_last is stated because transformers guesses the layout from the shape and
        # guesses wrong for a 1x1 (or 3-pixel-high) image; for every other image it is the guess.
        pv = proc.preprocess(square, return_tensors="np", input_data_format="channels_last")["pixel_values"][0]
        u8 = proc_u8.preprocess(square, return_tensors="np", input_data_format="channels_last")["pixel_values"][0]
        assert pv.shape == (3, 336, 336) and pv.dtype == np.float32, (pv.shape, pv.dtype)
        assert u8.shape == (3, 336, 336)
        assert np.array_equal(u8, np.round(u8)) and u8.min() >= 0 and u8.max() <= 255
        u8 = u8.astype(np.uint8)
        # Without expand2square: llava-hf's plain CLIPImageProcessor (image_aspect_ratio != "pad").
        pv_nopad = proc.preprocess(rgb, return_tensors="np", input_data_format="channels_last")["pixel_values"][0]
        err = float(np.abs(normalise(u8) - pv).max())
        assert err <= 1e-6, (name, err)
        stem = os.path.splitext(name)[0]
        Image.fromarray(np.ascontiguousarray(u8.transpose(1, 2, 0))).save(os.path.join(OUT, f"{stem}.png"), optimize=True)
        images[name] = {
            "mode": mode, "width": decoded.shape[1], "height": decoded.shape[0],
            "decoded_rgb_sha256": sha(decoded),
            "pixel_values_sha256": sha(pv),
            "pixel_values_nopad_sha256": sha(pv_nopad),
            "golden_png": f"{stem}.png",
            "normalise_max_abs_err": err,
        }
        if transposed is not None:
            # What ImageDecoder gives with applyExifOrientation (LLaVA itself ignores orientation).
            images[name]["exif_orientation"] = orientation
            images[name]["exif_transposed"] = {"width": transposed.shape[1], "height": transposed.shape[0],
                                               "rgb_sha256": sha(transposed)}
        print(f"{name:28s} {mode:5s} {decoded.shape[1]}x{decoded.shape[0]}")
    doc = {
        "schema": 1,
        "generator": "Scripts/reference/make_pixel_goldens.py",
        "versions": {"python": sys.version.split()[0], "pillow": PIL.__version__, "transformers": transformers.__version__,
                     "numpy": np.__version__, "libjpeg_turbo": features.version("libjpeg_turbo"), "zlib": features.version("zlib")},
        "pipeline": "Image.open().convert('RGB') -> expand2square(pad (122,116,104)) -> CLIPImageProcessor(slow) "
                    "shortest_edge 336, bicubic, centre crop 336, rescale 1/255, normalise OPENAI_CLIP mean/std",
        "pixel_values": "float32 [3,336,336] C order",
        "images": images,
        "synthetic": synthetic(os.path.join(OUT, "synthetic")),
    }
    with open(os.path.join(OUT, "goldens.json"), "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
