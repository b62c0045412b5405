#!/usr/bin/env python3
"""A LLaVA-1.5 checkpoint of random f16 weights at a real shape, in the llava-hf layout, for
measuring speed and memory where the real weights cannot be downloaded (`dllava-bench engine
--model DIR`). The numbers it produces mean nothing; the shapes, the dtype and the file layout are
those of the released checkpoints.

Shapes: llava-1.5-7b (CLIP ViT-L/14-336 + mlp2x_gelu + Vicuna-7B: 4096 x 32 layers, FFN 11008),
bench-1.57b (the same tower + a 2048 x 22 LLaMA, FFN 5632).

Usage:  python Scripts/bench/make_random_llava.py --shape llava-1.5-7b --out /tmp/llava-7b-random
Needs numpy. Writes tensor by tensor (about 14 GB for 7B), never holding the model in memory.
"""

import argparse
import json
import os
import struct

import numpy as np

SHAPES = {
    "llava-1.5-7b": dict(hidden=4096, ffn=11008, layers=32, heads=32),
    "bench-1.57b": dict(hidden=2048, ffn=5632, layers=22, heads=32),
}
VISION = dict(hidden=1024, ffn=4096, layers=24, heads=16, image=336, patch=14)
VOCABULARY = 32000


def tensors(shape):
    """(name, shape, fan_in or None for a norm weight / 0 for a bias) in file order."""
    v, t = VISION, shape
    p = "vision_tower.vision_model."
    yield p + "embeddings.class_embedding", [v["hidden"]], 0
    yield p + "embeddings.patch_embedding.weight", [v["hidden"], 3, v["patch"], v["patch"]], 3 * v["patch"] ** 2
    yield p + "embeddings.position_embedding.weight", [(v["image"] // v["patch"]) ** 2 + 1, v["hidden"]], 0
    yield p + "pre_layrnorm.weight", [v["hidden"]], None
    yield p + "pre_layrnorm.bias", [v["hidden"]], 0
    for i in range(v["layers"]):
        q = f"{p}encoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            yield q + f"self_attn.{n}.weight", [v["hidden"], v["hidden"]], v["hidden"]
            yield q + f"self_attn.{n}.bias", [v["hidden"]], 0
        for n in ("layer_norm1", "layer_norm2"):
            yield q + n + ".weight", [v["hidden"]], None
            yield q + n + ".bias", [v["hidden"]], 0
        yield q + "mlp.fc1.weight", [v["ffn"], v["hidden"]], v["hidden"]
        yield q + "mlp.fc1.bias", [v["ffn"]], 0
        yield q + "mlp.fc2.weight", [v["hidden"], v["ffn"]], v["ffn"]
        yield q + "mlp.fc2.bias", [v["hidden"]], 0
    yield p + "post_layernorm.weight", [v["hidden"]], None
    yield p + "post_layernorm.bias", [v["hidden"]], 0
    yield "multi_modal_projector.linear_1.weight", [t["hidden"], v["hidden"]], v["hidden"]
    yield "multi_modal_projector.linear_1.bias", [t["hidden"]], 0
    yield "multi_modal_projector.linear_2.weight", [t["hidden"], t["hidden"]], t["hidden"]
    yield "multi_modal_projector.linear_2.bias", [t["hidden"]], 0
    m = "language_model.model."
    yield m + "embed_tokens.weight", [VOCABULARY, t["hidden"]], 1
    for i in range(t["layers"]):
        q = f"{m}layers.{i}."
        yield q + "input_layernorm.weight", [t["hidden"]], None
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield q + f"self_attn.{n}.weight", [t["hidden"], t["hidden"]], t["hidden"]
        yield q + "post_attention_layernorm.weight", [t["hidden"]], None
        yield q + "mlp.gate_proj.weight", [t["ffn"], t["hidden"]], t["hidden"]
        yield q + "mlp.up_proj.weight", [t["ffn"], t["hidden"]], t["hidden"]
        yield q + "mlp.down_proj.weight", [t["hidden"], t["ffn"]], t["ffn"]
    yield m + "norm.weight", [t["hidden"]], None
    yield "language_model.lm_head.weight", [VOCABULARY, t["hidden"]], t["hidden"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llava-1.5-7b")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    shape = SHAPES[args.shape]
    os.makedirs(args.out, exist_ok=True)

    entries = list(tensors(shape))
    header, offset = {}, 0
    for name, dims, _ in entries:
        size = int(np.prod(dims)) * 2
        header[name] = {"dtype": "F16", "shape": dims, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * ((8 - len(encoded) % 8) % 8)

    # One pool of standard normal values; each tensor takes a slice at a random offset, scaled by
    # 1/sqrt(fan_in) (a large model is written in minutes instead of drawing 7e9 normals).
    rng = np.random.default_rng(args.seed)
    pool = rng.standard_normal(1 << 26).astype(np.float32)
    with open(os.path.join(args.out, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name, dims, fan_in in entries:
            count = int(np.prod(dims))
            written = 0
            while written < count:
                n = min(count - written, len(pool) // 2)
                start = int(rng.integers(0, len(pool) - n + 1))
                chunk = pool[start:start + n]
                if fan_in is None:
                    values = 1 + 0.05 * chunk
                elif fan_in == 0:
                    values = 0.02 * chunk
                else:
                    values = chunk / np.sqrt(fan_in)
                f.write(values.astype(np.float16).tobytes())
                written += n

    v, t = VISION, shape
    config = {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "image_token_index": 32000,
        "image_seq_length": (v["image"] // v["patch"]) ** 2, "projector_hidden_act": "gelu", "multimodal_projector_bias": True,
        "tie_word_embeddings": False, "torch_dtype": "float16", "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "text_config": {"model_type": "llama", "hidden_size": t["hidden"], "intermediate_size": t["ffn"],
                        "num_hidden_layers": t["layers"], "num_attention_heads": t["heads"], "num_key_value_heads": t["heads"],
                        "vocab_size": VOCABULARY, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096,
                        "hidden_act": "silu", "pad_token_id": 0},
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": v["hidden"], "intermediate_size": v["ffn"],
                          "num_hidden_layers": v["layers"], "num_attention_heads": v["heads"], "image_size": v["image"],
                          "patch_size": v["patch"], "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 768},
    }
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    print(f"{args.out}: {args.shape}, {offset / 1e9:.2f} GB of f16 weights")


if __name__ == "__main__":
    main()
