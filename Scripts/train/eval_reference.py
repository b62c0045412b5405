#!/usr/bin/env python3
"""Loads an EXPORTED scene model (export.py's directory) with plain transformers classes and
scores greedy full-context answers on test scenes. Uses no training code (model.py, train.py,
data.py): only config.json, the safetensors files, clip/ and tokenizer.model, plus the scene
generator and scorer. It proves the export is loadable and gives the Python reference numbers
for the Swift engine's full-context mode.

Pipeline (DYNAMIC_LLAVA.md section 1): CLIPImageProcessor from clip/preprocessor_config.json
(the 336x336 scenes need no padding), CLIPVisionModel hidden_states[-2] without CLS, mm_projector
(Linear, exact GELU, Linear), vicuna_v1 prompt through LLaVA's tokenizer_image_token with the slow
LlamaTokenizer (legacy=False), LlamaForCausalLM.generate(inputs_embeds=...) greedy with the KV
cache, float32 compute from the float16 weights. The predictors are loaded and shape-checked
against sparse_config (section 3) but not used.

Usage:  python eval_reference.py --model runs/full/export [--count 100] [--split test] [--json out.json]
"""

import argparse
import json
import os
import sys

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file
from transformers import CLIPImageProcessor, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, LlamaTokenizer

import scenes
import score

LLAMA_FIELDS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rms_norm_eps", "rope_theta", "max_position_embeddings", "bos_token_id",
                "eos_token_id", "pad_token_id", "tie_word_embeddings", "hidden_act", "attention_bias", "mlp_bias"]
IMAGE_TOKEN_INDEX = -200


def expected_predictor_shapes(h, sc):
    d, ff = sc["d_model"], sc["dim_feedforward"]
    shapes = {"down_mlp.0.weight": [h], "down_mlp.0.bias": [h], "down_mlp.1.weight": [d, h], "down_mlp.1.bias": [d],
              "output_mlp.0.weight": [d // 2, d], "output_mlp.0.bias": [d // 2],
              "output_mlp.2.weight": [d // 4, d // 2], "output_mlp.2.bias": [d // 4],
              "output_mlp.4.weight": [2, d // 4], "output_mlp.4.bias": [2]}
    for i in range(sc["num_layers"]):
        p = f"transformer.{i}."
        shapes.update({p + "norm1.weight": [d], p + "norm1.bias": [d], p + "attn.qkv.weight": [3 * d, d],
                       p + "attn.proj.weight": [d, d], p + "attn.proj.bias": [d], p + "norm2.weight": [d],
                       p + "norm2.bias": [d], p + "mlp.fc1.weight": [ff, d], p + "mlp.fc1.bias": [ff],
                       p + "mlp.fc2.weight": [d, ff], p + "mlp.fc2.bias": [d]})
    text = {"output_mlp.0.weight": [h], "output_mlp.0.bias": [h], "output_mlp.1.weight": [d, h],
            "output_mlp.1.bias": [d], "output_mlp.3.weight": [d // 2, d], "output_mlp.3.bias": [d // 2],
            "output_mlp.5.weight": [d // 4, d // 2], "output_mlp.5.bias": [d // 4],
            "output_mlp.7.weight": [2, d // 4], "output_mlp.7.bias": [2]}
    out = {"model.image_score_predictor." + k: v for k, v in shapes.items()}
    out.update({"model.output_text_score_predictor." + k: v for k, v in text.items()})
    return out


class Exported:
    def __init__(self, d):
        with open(os.path.join(d, "config.json")) as f:
            cfg = json.load(f)
        assert cfg["model_type"] == "llava_llama" and cfg["mm_projector_type"] == "mlp2x_gelu"
        assert cfg["mm_vision_select_layer"] == -2 and cfg["mm_vision_select_feature"] == "patch"
        self.cfg = cfg
        clip_dir = os.path.join(d, cfg["mm_vision_tower"])
        self.vision, info = CLIPVisionModel.from_pretrained(clip_dir, dtype=torch.float32, output_loading_info=True,
                                                            attn_implementation="eager", local_files_only=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
        assert self.vision.config.hidden_size == cfg["mm_hidden_size"]
        self.processor = CLIPImageProcessor.from_pretrained(clip_dir)
        weights = {k: v.float() for k, v in load_file(os.path.join(d, "model.safetensors")).items()}
        h = cfg["hidden_size"]
        self.projector = nn.Sequential(nn.Linear(cfg["mm_hidden_size"], h), nn.GELU(), nn.Linear(h, h))
        self.projector.load_state_dict({k[len("model.mm_projector."):]: weights.pop(k) for k in list(weights)
                                        if k.startswith("model.mm_projector.")})
        for k, shape in expected_predictor_shapes(h, cfg["sparse_config"]).items():
            w = weights.pop(k)
            assert list(w.shape) == shape, f"{k}: {list(w.shape)} != {shape}"
        tc = LlamaConfig(**{k: cfg[k] for k in LLAMA_FIELDS if k in cfg})
        tc._attn_implementation = "eager"
        self.llm = LlamaForCausalLM(tc)
        missing, unexpected = self.llm.load_state_dict(weights, strict=False)
        assert not missing and not unexpected, (missing, unexpected)
        for m in (self.vision, self.projector, self.llm):
            m.eval()
        self.tok = LlamaTokenizer(vocab_file=os.path.join(d, "tokenizer.model"), legacy=False)

    def prompt_ids(self, question):
        """LLaVA's tokenizer_image_token on the vicuna_v1 prompt."""
        text = scenes.SYSTEM + " USER: <image>\n" + question + " ASSISTANT:"
        chunks = [self.tok(c).input_ids for c in text.split("<image>")]
        return chunks[0] + [IMAGE_TOKEN_INDEX] + chunks[1][1:]

    def pixels(self, img):
        return self.processor(images=img, return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def answer(self, img, question, max_new=72):
        ids = self.prompt_ids(question)
        cut = ids.index(IMAGE_TOKEN_INDEX)
        vis = self.vision(self.pixels(img), output_hidden_states=True).hidden_states[-2][:, 1:]
        emb = self.llm.model.embed_tokens
        x = torch.cat([emb(torch.tensor([ids[:cut]])), self.projector(vis), emb(torch.tensor([ids[cut + 1:]]))], 1)
        out = self.llm.generate(inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long),
                                max_new_tokens=max_new, do_sample=False, num_beams=1,
                                eos_token_id=self.cfg["eos_token_id"], pad_token_id=0)
        return self.tok.decode(out[0], skip_special_tokens=True).strip()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--split", default="test", choices=["val", "test"])
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--json", help="write per-scene results and the summary here")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--show", type=int, default=3, help="print this many examples")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    m = Exported(args.model)
    # LLaVA's preprocessing of an already-square 336 image is a plain normalisation: check it once.
    img = scenes.render(scenes.make_scene(scenes.scene_index(args.split, args.start)))
    mean, std = np.array(m.processor.image_mean), np.array(m.processor.image_std)
    simple = ((np.asarray(img, np.float32) / 255 - mean) / std).transpose(2, 0, 1)
    diff = float(np.abs(m.pixels(img)[0].numpy() - simple).max())
    print(f"CLIPImageProcessor vs plain normalisation: max |diff| {diff:.2e}")
    cap_rows, qa_rows, per_scene = [], [], []
    for k in range(args.start, args.start + args.count):
        scene = scenes.make_scene(scenes.scene_index(args.split, k))
        img = scenes.render(scene)
        cap = m.answer(img, scenes.DESCRIBE)
        cs = score.score_caption(cap, scene)
        q, a, t = scenes.questions(scene, k=1)[0]
        ans = m.answer(img, q, max_new=8)
        qs = score.score_answer(ans, a)
        cap_rows.append(cs)
        qa_rows.append({"question_accuracy": qs})
        per_scene.append({"index": scene["index"], "caption": cap, "truth": scenes.caption(scene), **cs,
                          "question": q, "answer": ans, "expected": a, "type": t, "question_correct": qs})
        if k - args.start < args.show:
            print(f"[{scene['index']}] truth: {scenes.caption(scene)}\n          model: {cap}\n"
                  f"          {q} -> {ans!r} (expected {a!r})")
    summary = {**score.summarise(cap_rows), **score.summarise(qa_rows), "scenes": args.count, "split": args.split}
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "scenes": per_scene}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
