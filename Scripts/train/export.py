#!/usr/bin/env python3
"""Exports a trained scene model (train.py's final.pt) in the original Dynamic-LLaVA layout.

Output directory:
  config.json              llava_llama config (LLaMA fields + mm_* fields + sparse_config)
  model.safetensors        float16: model.embed_tokens.*, model.layers.N.*, model.norm.*, lm_head.*,
                           model.mm_projector.{0,2}.*, model.image_score_predictor.*,
                           model.output_text_score_predictor.*
  clip/config.json         CLIPVisionConfig (model_type clip_vision_model, CLIPVisionModel)
  clip/model.safetensors   float16, keys vision_model.*
  clip/preprocessor_config.json   CLIPImageProcessor for 336 px (LLaVA-1.5's)
  tokenizer.model          the SentencePiece model (+ tokenizer_config.json: legacy false, BOS on)

Key names and shapes follow DYNAMIC_LLAVA.md sections 1, 3 and 5 (and the authors' code).
Usage:  python export.py --final runs/full/stage2/final.pt --out runs/full/export [--name NAME]
"""

import argparse
import json
import os
import shutil

import torch
import transformers
from safetensors.torch import save_file
from transformers import CLIPImageProcessor, PretrainedConfig

from model import ModelSize, SceneLlava, SparseConfig, text_config, vision_config

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_BYTES = 40 * 1024 * 1024
DTYPE = torch.float16


def checkpoint_key(name):
    """SceneLlava parameter name -> (component, checkpoint key)."""
    if name.startswith("vision."):
        return "clip", name[len("vision."):]                       # vision_model.*
    if name.startswith("projector."):
        return "lm", "model.mm_projector." + name[len("projector."):]
    if name.startswith("llm.model."):
        return "lm", "model." + name[len("llm.model."):]
    if name.startswith("llm.lm_head."):
        return "lm", name[len("llm."):]
    for pred in ("image_score_predictor.", "output_text_score_predictor."):
        if name.startswith(pred):
            return "lm", "model." + name
    raise KeyError(name)


def image_processor(size):
    return CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        do_resize=True, do_center_crop=True, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711], do_convert_rgb=True, resample=3)


def llava_config(size, sparse, vocab_size, name):
    tc = text_config(size, vocab_size).to_dict()
    generic = set(PretrainedConfig().to_dict()) - {
        "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings", "architectures"}
    cfg = {k: v for k, v in tc.items() if k not in generic}
    for k in ("dtype", "torch_dtype", "transformers_version", "_attn_implementation_autoset"):
        cfg.pop(k, None)
    cfg.update({
        "_name_or_path": name,
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama",
        "torch_dtype": "float16",
        "transformers_version": transformers.__version__,
        "mm_vision_tower": "clip",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_projector_type": "mlp2x_gelu",
        "mm_hidden_size": size.vision_hidden,
        "image_aspect_ratio": "pad",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "mm_patch_merge_type": "flat",
        "use_mm_proj": True,
        "freeze_mm_mlp_adapter": False,
        "tune_mm_mlp_adapter": False,
        "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right",
        "use_cache": True,
        "sparse_config": {k: v for k, v in sparse.__dict__.items()},
    })
    return cfg


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def export(final_path, out, tokenizer, name):
    ck = torch.load(final_path, map_location="cpu", weights_only=False)
    size, sparse = ModelSize(**ck["size"]), SparseConfig(**ck["sparse"])
    model = SceneLlava(size, ck["vocab_size"], sparse)
    model.load_state_dict(ck["model"])
    lm, clip = {}, {}
    for k, v in model.state_dict().items():
        comp, key = checkpoint_key(k)
        (lm if comp == "lm" else clip)[key] = v.detach().to(DTYPE).contiguous()
    os.makedirs(os.path.join(out, "clip"), exist_ok=True)
    meta = {"format": "pt"}
    save_file(lm, os.path.join(out, "model.safetensors"), metadata=meta)
    save_file(clip, os.path.join(out, "clip", "model.safetensors"), metadata=meta)
    write_json(os.path.join(out, "config.json"), llava_config(size, sparse, ck["vocab_size"], name))
    vc = vision_config(size)
    vc.architectures = ["CLIPVisionModel"]
    vc.dtype = DTYPE
    vc.save_pretrained(os.path.join(out, "clip"))
    image_processor(size.image_size).save_pretrained(os.path.join(out, "clip"))
    shutil.copyfile(tokenizer, os.path.join(out, "tokenizer.model"))
    write_json(os.path.join(out, "tokenizer_config.json"), {
        "tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": True,
        "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": None, "model_max_length": 2048, "padding_side": "right"})
    total = 0
    for root, _, files in os.walk(out):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    if total > MAX_BYTES:
        raise SystemExit(f"export is {total / 1e6:.1f} MB > 40 MiB")
    print(f"exported {final_path} (stage {ck['stage']}, {ck['steps']} steps) to {out}: "
          f"{len(lm)} LM tensors, {len(clip)} CLIP tensors, {total / 1e6:.2f} MB")
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--final", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer", default=os.path.join(HERE, "tokenizer", "tokenizer.model"))
    ap.add_argument("--name", default="dllava-scenes")
    args = ap.parse_args()
    export(args.final, args.out, args.tokenizer, args.name)


if __name__ == "__main__":
    main()
