#!/usr/bin/env python3
"""Recompute the goldens from the checkpoint files alone, without transformers.

A plain-torch float32 re-implementation of LLaVA-1.5 (CLIP -> hidden_states[-2] minus CLS ->
mlp2x_gelu -> splice -> LLaMA with RoPE + KV cache -> greedy) that reads only what a loader
(e.g. the Swift engine) reads: config.json files and safetensors files.  It checks every golden
tensor to the Swift tolerance (||a-b|| / ||b|| <= 1e-4) and greedy ids exactly, so it documents
(and tests) the exact semantics the goldens encode.

Usage:  /path/to/venv/bin/python Scripts/reference/check_goldens_independent.py [--fixtures DIR]
"""

import argparse
import json
import math
import os
import sys

import torch
from safetensors.torch import load_file

torch.set_num_threads(1)
REL_TOL = 1e-4
NUM_PATCHES = 576

# LlamaConfig / CLIPVisionConfig defaults for fields transformers omits from a saved config.json
LLAMA_DEFAULTS = dict(bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-6, rope_theta=10000.0,
                      hidden_act="silu", rope_scaling=None)
CLIP_DEFAULTS = dict(hidden_act="quick_gelu", layer_norm_eps=1e-5, num_channels=3)


def load_hf(d):
    cfg = json.load(open(os.path.join(d, "config.json")))
    t = {**LLAMA_DEFAULTS, **cfg["text_config"]}
    v = {**CLIP_DEFAULTS, **cfg["vision_config"]}
    w = {k: x.float() for k, x in load_file(os.path.join(d, "model.safetensors")).items()}
    lm = {k[len("language_model."):]: x for k, x in w.items() if k.startswith("language_model.")}
    vis = {k[len("vision_tower."):]: x for k, x in w.items() if k.startswith("vision_tower.")}
    proj = {
        "0.weight": w["multi_modal_projector.linear_1.weight"],
        "0.bias": w["multi_modal_projector.linear_1.bias"],
        "2.weight": w["multi_modal_projector.linear_2.weight"],
        "2.bias": w["multi_modal_projector.linear_2.bias"],
    }
    assert cfg["vision_feature_layer"] == -2 and cfg["vision_feature_select_strategy"] == "default"
    assert cfg["projector_hidden_act"] == "gelu"
    return t, v, lm, vis, proj


def load_orig(d):
    cfg = json.load(open(os.path.join(d, "config.json")))
    t = {**LLAMA_DEFAULTS, **cfg}
    clip_dir = os.path.join(d, cfg["mm_vision_tower"])
    v = {**CLIP_DEFAULTS, **json.load(open(os.path.join(clip_dir, "config.json")))}
    index = json.load(open(os.path.join(d, "model.safetensors.index.json")))
    w = {}
    for f in sorted(set(index["weight_map"].values())):
        w.update(load_file(os.path.join(d, f)))
    w = {k: x.float() for k, x in w.items()}
    proj = {k[len("model.mm_projector."):]: w.pop(k) for k in list(w) if k.startswith("model.mm_projector.")}
    vis = {k: x.float() for k, x in load_file(os.path.join(clip_dir, "model.safetensors")).items()}
    assert cfg["mm_vision_select_layer"] == -2 and cfg["mm_vision_select_feature"] == "patch"
    assert cfg["mm_projector_type"] == "mlp2x_gelu"
    return t, v, w, vis, proj


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def rms_norm(x, w, eps):
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * w


def lin(x, w, b=None):
    y = x @ w.T
    return y + b if b is not None else y


def clip_hidden_states(v, W, pix):
    """Returns [h0, h1, ..., hL]; h0 = pre_layrnorm(embeddings). pix: [3, H, W]."""
    p, dmod, nh = v["patch_size"], v["hidden_size"], v["num_attention_heads"]
    eps = v["layer_norm_eps"]
    g = pix.shape[-1] // p
    # conv with stride = kernel = patch, no bias: flatten each patch in (c, ky, kx) order
    patches = pix.reshape(3, g, p, g, p).permute(1, 3, 0, 2, 4).reshape(g * g, 3 * p * p)
    pe = patches @ W["vision_model.embeddings.patch_embedding.weight"].reshape(dmod, -1).T
    x = torch.cat([W["vision_model.embeddings.class_embedding"][None], pe], 0)
    x = x + W["vision_model.embeddings.position_embedding.weight"]
    x = layer_norm(x, W["vision_model.pre_layrnorm.weight"], W["vision_model.pre_layrnorm.bias"], eps)
    hs = [x]
    hd = dmod // nh
    for i in range(v["num_hidden_layers"]):
        P = f"vision_model.encoder.layers.{i}."
        h = layer_norm(x, W[P + "layer_norm1.weight"], W[P + "layer_norm1.bias"], eps)
        q = lin(h, W[P + "self_attn.q_proj.weight"], W[P + "self_attn.q_proj.bias"])
        k = lin(h, W[P + "self_attn.k_proj.weight"], W[P + "self_attn.k_proj.bias"])
        val = lin(h, W[P + "self_attn.v_proj.weight"], W[P + "self_attn.v_proj.bias"])
        n = x.shape[0]
        q, k, val = (t.reshape(n, nh, hd).transpose(0, 1) for t in (q, k, val))
        a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd), -1) @ val  # full (non-causal)
        a = a.transpose(0, 1).reshape(n, dmod)
        x = x + lin(a, W[P + "self_attn.out_proj.weight"], W[P + "self_attn.out_proj.bias"])
        h = layer_norm(x, W[P + "layer_norm2.weight"], W[P + "layer_norm2.bias"], eps)
        h = lin(h, W[P + "mlp.fc1.weight"], W[P + "mlp.fc1.bias"])
        assert v["hidden_act"] == "quick_gelu"
        h = h * torch.sigmoid(1.702 * h)
        x = x + lin(h, W[P + "mlp.fc2.weight"], W[P + "mlp.fc2.bias"])
        hs.append(x)
    return hs


def projector(P, x):
    h = lin(x, P["0.weight"], P["0.bias"])
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU
    return lin(h, P["2.weight"], P["2.bias"])


class Llama:
    def __init__(self, t, W):
        self.t, self.W = t, W
        self.nh, self.nkv = t["num_attention_heads"], t["num_key_value_heads"]
        self.hd = t["hidden_size"] // self.nh
        self.cache = [([], []) for _ in range(t["num_hidden_layers"])]
        self.pos = 0

    def rope(self, x, pos):  # x [n, heads, hd], non-interleaved rotate_half
        hd = self.hd
        inv = 1.0 / (self.t["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        ang = pos[:, None].float() * inv[None]
        emb = torch.cat([ang, ang], -1)
        cos, sin = emb.cos()[:, None], emb.sin()[:, None]
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def forward(self, emb, record=None):
        W, t, eps = self.W, self.t, self.t["rms_norm_eps"]
        n = emb.shape[0]
        pos = torch.arange(self.pos, self.pos + n)
        x = emb
        for i in range(t["num_hidden_layers"]):
            P = f"model.layers.{i}."
            h = rms_norm(x, W[P + "input_layernorm.weight"], eps)
            q = lin(h, W[P + "self_attn.q_proj.weight"]).reshape(n, self.nh, self.hd)
            k = lin(h, W[P + "self_attn.k_proj.weight"]).reshape(n, self.nkv, self.hd)
            v = lin(h, W[P + "self_attn.v_proj.weight"]).reshape(n, self.nkv, self.hd)
            q, k = self.rope(q, pos), self.rope(k, pos)
            ck, cv = self.cache[i]
            ck.append(k)
            cv.append(v)
            K, V = torch.cat(ck), torch.cat(cv)  # [S, nkv, hd]
            rep = self.nh // self.nkv  # GQA: query head j uses kv head j // rep
            K, V = K.repeat_interleave(rep, 1), V.repeat_interleave(rep, 1)
            s = torch.einsum("nhd,shd->hns", q, K) / math.sqrt(self.hd)
            kpos = torch.arange(K.shape[0])
            s = s.masked_fill(kpos[None, None, :] > pos[None, :, None], float("-inf"))
            a = torch.einsum("hns,shd->nhd", torch.softmax(s, -1), V).reshape(n, -1)
            x = x + lin(a, W[P + "self_attn.o_proj.weight"])
            h = rms_norm(x, W[P + "post_attention_layernorm.weight"], eps)
            g = lin(h, W[P + "mlp.gate_proj.weight"])
            u = lin(h, W[P + "mlp.up_proj.weight"])
            x = x + lin(torch.nn.functional.silu(g) * u, W[P + "mlp.down_proj.weight"])
            if record is not None:
                record[f"hidden_after_layer_{i}"] = x
        self.pos += n
        last = rms_norm(x[-1], W["model.norm.weight"], eps)
        if record is not None:
            record["final_norm_output_last"] = last
        return lin(last, W["lm_head.weight"])


def run_case(t, v, lm, vis, proj, case, pix, n_steps):
    r = {}
    hs = clip_hidden_states(v, vis, pix[0])
    r["vision_features"] = hs[-2][1:]
    r["projector_output"] = projector(proj, r["vision_features"])
    E = lm["model.embed_tokens.weight"]
    r["inputs_embeds"] = torch.cat([
        E[torch.tensor(case["ids_before_image"])], r["projector_output"], E[torch.tensor(case["ids_after_image"])]
    ])
    model = Llama(t, lm)
    logits = [model.forward(r["inputs_embeds"], record=r)]
    for _ in range(n_steps - 1):
        tok = int(logits[-1].argmax())
        logits.append(model.forward(E[tok][None]))
    r["step_logits"] = torch.stack(logits)
    r["greedy_ids"] = r["step_logits"].argmax(-1)
    return r


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    repo = os.path.dirname(os.path.dirname(here))
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", default=os.path.join(repo, "Tests", "EngineTests", "Fixtures"))
    fx = ap.parse_args().fixtures
    inputs = json.load(open(os.path.join(fx, "goldens", "inputs.json")))
    pixels = load_file(os.path.join(fx, "goldens", "inputs.safetensors"))
    ok = True
    for mname, loader in (("llava_hf_tiny", load_hf), ("llava_orig_tiny", load_orig)):
        t, v, lm, vis, proj = loader(os.path.join(fx, "models", mname))
        for k, case in enumerate(inputs["cases"]):
            gold = load_file(os.path.join(fx, "goldens", mname, f"case{k}.safetensors"))
            n_steps = gold["step_logits"].shape[0]
            with torch.no_grad():
                r = run_case(t, v, lm, vis, proj, case, pixels[f"pixel_values_{k}"], n_steps)
            assert set(r) == set(gold), (sorted(r), sorted(gold))
            worst = 0.0
            for name, g in gold.items():
                a = r[name]
                assert tuple(a.shape) == tuple(g.shape), (name, a.shape, g.shape)
                if name == "greedy_ids":
                    if a.tolist() != g.tolist():
                        ok = False
                        print(f"FAIL {mname} case{k} greedy {a.tolist()} != {g.tolist()}")
                    continue
                rel = float((a - g).norm() / g.norm())
                worst = max(worst, rel)
                if rel > REL_TOL:
                    ok = False
                    print(f"FAIL {mname} case{k} {name}: rel {rel:.2e}")
            print(f"{mname} case{k}: worst relative error {worst:.2e}, greedy ids match")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
