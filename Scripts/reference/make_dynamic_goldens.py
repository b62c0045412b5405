#!/usr/bin/env python3
"""Tiny Dynamic-LLaVA checkpoint (original layout) and the goldens of its sparsified inference.

Follows docs/DYNAMIC_LLAVA.md (the contract); the behaviour it encodes was
read from the authors' repository Osilly/dynamic_llava (llava/model/language_model/
dynamic_modeling_llama.py, cache_utils.py, dynamic_llava_arch.py), with the .md's "we differ"
points applied (per-request state, no duplicated token in no-cache decoding, batch 1 here).
Scripts/reference/README-dynamic.md describes every tensor and every decision rule.

Writes, under Tests/EngineTests/Fixtures/ (relative to the repo root):
  models/dynamic_llava_tiny/                 llava_llama config.json with sparse_config,
                                             model.safetensors (f16: LLM, projector, predictors),
                                             clip/ (CLIPVisionModel, bf16)
  goldens/dynamic_llava_tiny/case<k>.safetensors + case<k>.json   for the two input cases of
                                             goldens/inputs.{json,safetensors} (read, not written)

Seeded, deterministic, CPU, float32 compute from the f16/bf16-rounded weights, 1 thread.
Built on transformers' LlamaDecoderLayer (eager attention) with our own predictor modules.

Usage:  /path/to/venv/bin/python Scripts/reference/make_dynamic_goldens.py [--out DIR]
"""

import argparse
import json
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlavaConfig, PretrainedConfig
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_llava_goldens as base  # noqa: E402  (shared sizes, init, CLIP/projector helpers)

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

MODEL_NAME = "dynamic_llava_tiny"
NUM_PATCHES = 576
N_LAYERS = 4
SPARSE_CONFIG = {
    # released field names (SparseArguments of the authors' train_sparse.py, saved as
    # config.sparse_config = vars(sparse_args)); predictor sizes shrunk for the tiny model
    "use_vision_predictor": True,
    "vision_keep_rate": 0.2,
    "use_text_predictor": True,
    "use_output_text_predictor": True,
    "output_text_keep_rate": 0.5,
    "output_text_len_for_training": 50,
    "use_instruct_predictor": False,
    "instruct_keep_rate": 0.7,
    "instruct_len_for_training": 25,
    "sparse_layer": 2,
    "d_model": 32,
    "nhead": 4,
    "dim_feedforward": 64,
    "num_layers": 2,
    "mask_loss_weight": 100.0,
    # unknown to our engine (the released 13B config has maskclip* fields): must be ignored
    "maskclip_dummy": 1,
}
TEXT = dict(base.TEXT, num_hidden_layers=N_LAYERS)
NUM_KV_HEADS = 2  # GQA on the sparse path too

N_DYNAMIC_STEPS = 16  # logits rows: prefill + 15 cached decode steps
N_NOCACHE_STEPS = 16
N_FASTV_STEPS = 8
N_FULL_STEPS = 8
FASTV_K = 2
FASTV_R = 0.75

# Robustness of every golden decision (asserted; the seed is bumped until all hold)
MIN_IMAGE_GAP = 1e-3  # log-softmax score gap between the k-th and (k+1)-th image token
MIN_GATE_MARGIN = 1e-3  # |logit0 - logit1| of every output-text gate evaluation
MIN_TOPK_GAP = 1e-3  # no-cache: logit0 gap at the top-k boundary among the gated tokens
MIN_FASTV_REL_GAP = 1e-4  # FastV: (w_k - w_{k+1}) / w_k of the head-mean attention weights
MIN_GREEDY_MARGIN = 5e-3  # top-1 minus top-2 logit at every greedy step of every mode
MIN_DISTINCT_GREEDY = 5  # per mode and case; greedy ids never 0, 1, 2 or 999
MAX_ABS = 100.0

# Predictor init: Linear ~ N(0, (PRED_GAIN / sqrt(fan_in))^2), biases PRED_BIAS_STD * N(0, 1),
# LayerNorm weight 1 + 0.1 N(0, 1), bias 0.1 N(0, 1); the 2-logit heads scaled by PRED_HEAD_GAIN.
PRED_GAIN = math.sqrt(2.0)
PRED_BIAS_STD = 0.1
PRED_HEAD_GAIN = 4.0
IMAGE_BOUNDARY_D = -2.0  # calibrate_predictors
LM_HEAD_EXTRA_GAIN = 2.0  # lm_head ~ N(0, (2 * 2 / sqrt(64))^2): decisive, less repetitive greedy

SEED_MODEL = 4000
MAX_ATTEMPTS = 60
TOL = 1e-5  # internal cross-checks (max |diff| / max |ref|)


# --------------------------------------------------------------------------------------------
# Predictors (DYNAMIC_LLAVA.md section 3; module and key names as in the authors' code:
# VisionPredictor / TextPredictor of dynamic_modeling_llama.py, the ViT block of
# custom_transformer_layer.py). Hidden sizes derive from sparse_config: d = d_model, the
# transformer FFN = dim_feedforward (authors: mlp_ratio = dim_feedforward / d_model, hidden =
# int(d_model * mlp_ratio)), head dim = d_model / nhead, output MLP d -> d/2 -> d/4 -> 2.
# --------------------------------------------------------------------------------------------
class PredictorAttention(nn.Module):
    def __init__(self, d, nhead):
        super().__init__()
        self.nhead = nhead
        self.qkv = nn.Linear(d, 3 * d, bias=False)  # (3d, d)
        self.proj = nn.Linear(d, d)  # (d, d) + (d)

    def forward(self, x):  # [B, N, d], no mask
        b, n, d = x.shape
        hd = d // self.nhead
        q, k, v = self.qkv(x).reshape(b, n, 3, self.nhead, hd).permute(2, 0, 3, 1, 4)
        w = torch.softmax((q * hd**-0.5) @ k.transpose(-2, -1), dim=-1)
        return self.proj((w @ v).transpose(1, 2).reshape(b, n, d))


class PredictorMlp(nn.Module):
    def __init__(self, d, ffn):
        super().__init__()
        self.fc1 = nn.Linear(d, ffn)
        self.fc2 = nn.Linear(ffn, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class PredictorBlock(nn.Module):
    """Pre-norm ViT block: x += proj(attn(qkv(LN1 x))); x += fc2(GELU(fc1(LN2 x)))."""

    def __init__(self, d, nhead, ffn):
        super().__init__()
        self.norm1 = nn.LayerNorm(d, eps=1e-5)
        self.attn = PredictorAttention(d, nhead)
        self.norm2 = nn.LayerNorm(d, eps=1e-5)
        self.mlp = PredictorMlp(d, ffn)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ImageScorePredictor(nn.Module):
    """`model.image_score_predictor`: [B, N, H] image hidden states -> logits [B, N, 2], ch. 0 = keep."""

    def __init__(self, hidden, sc):
        super().__init__()
        d = sc["d_model"]
        self.down_mlp = nn.Sequential(nn.LayerNorm(hidden, eps=1e-5), nn.Linear(hidden, d), nn.GELU())
        self.transformer = nn.Sequential(
            *[PredictorBlock(d, sc["nhead"], sc["dim_feedforward"]) for _ in range(sc["num_layers"])])
        self.output_mlp = nn.Sequential(
            nn.Linear(d, d // 2), nn.GELU(), nn.Linear(d // 2, d // 4), nn.GELU(), nn.Linear(d // 4, 2))

    def forward(self, x):
        # inference: the policy is all ones, so the policy-weighted mean is the plain mean
        y = self.transformer(self.down_mlp(x))
        c = y.shape[-1]
        glob = y[:, :, c // 2:].mean(dim=1, keepdim=True).expand(-1, y.shape[1], -1)
        return self.output_mlp(torch.cat([y[:, :, : c // 2], glob], dim=-1))


class OutputTextScorePredictor(nn.Module):
    """`model.output_text_score_predictor`: per token [.., H] -> logits [.., 2], ch. 0 = keep."""

    def __init__(self, hidden, sc):
        super().__init__()
        d = sc["d_model"]
        self.output_mlp = nn.Sequential(
            nn.LayerNorm(hidden, eps=1e-5), nn.Linear(hidden, d), nn.GELU(), nn.Linear(d, d // 2), nn.GELU(),
            nn.Linear(d // 2, d // 4), nn.GELU(), nn.Linear(d // 4, 2))

    def forward(self, x):
        return self.output_mlp(x)


def randomise_predictor(mod, g):
    heads = {"output_mlp.4.weight", "output_mlp.7.weight"}  # the final 2-logit layers
    with torch.no_grad():
        for name, p in sorted(mod.named_parameters()):
            parent = mod.get_submodule(name.rsplit(".", 1)[0])
            if isinstance(parent, nn.LayerNorm):
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(PRED_BIAS_STD * torch.randn(p.shape, generator=g))
            else:
                gain = PRED_HEAD_GAIN if name in heads else PRED_GAIN
                p.copy_(gain / p.shape[1] ** 0.5 * torch.randn(p.shape, generator=g))


# --------------------------------------------------------------------------------------------
# The model: HF LLaVA (vision tower, projector, LlamaDecoderLayers) + the two predictors
# --------------------------------------------------------------------------------------------
def make_llava_config():
    c = LlavaConfig(
        vision_config=CLIPVisionConfig(**base.VISION),
        text_config=LlamaConfig(num_key_value_heads=NUM_KV_HEADS, **TEXT),
        image_token_index=base.IMAGE_TOKEN_INDEX_HF,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=NUM_PATCHES,
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )
    return c


class DynamicLlava(nn.Module):
    def __init__(self, sc):
        super().__init__()
        self.sc = sc
        self.llava = base.build_model(make_llava_config())
        h = TEXT["hidden_size"]
        self.image_score_predictor = ImageScorePredictor(h, sc)
        self.output_text_score_predictor = OutputTextScorePredictor(h, sc)
        self.eval()

    @property
    def lm(self):
        return self.llava.model.language_model


def orig_key(k):
    """DynamicLlava state_dict key -> (component, key in the original-layout files)."""
    if k.startswith("llava."):
        return base.hf_to_orig_key(k[len("llava."):])
    return "lm", "model." + k  # model.image_score_predictor.*, model.output_text_score_predictor.*


def round_to_storage(m):
    """Round every parameter to its storage dtype; the goldens are computed from these values."""
    with torch.no_grad():
        for name, p in m.named_parameters():
            dt = torch.bfloat16 if orig_key(name)[0] == "clip" else torch.float16
            p.copy_(p.to(dt).to(torch.float32))


@torch.no_grad()
def calibrate_predictors(m, case, pixel_values):
    """Shift the channel-0 bias of both 2-logit heads, using case 0's sparse-layer input only.

    Image head: the (k+1)-th largest d = logit0 - logit1 lands at IMAGE_BOUNDARY_D, so the top-k
    boundary sits where log_softmax is still close to linear in d (scores near 0 saturate to
    exact ties in f32). Output-text head: the median d over the prompt's text tokens lands at 0,
    so generated tokens are kept or dropped in roughly equal numbers."""
    ref = Ref(m)
    emb, s = ref.embed_prompt(case, pixel_values)
    h, pos = emb, torch.arange(emb.shape[0])
    for i in range(ref.l):
        h = ref.layer(i, h, pos)
    k = int(NUM_PATCHES * m.sc["vision_keep_rate"])
    lg = m.image_score_predictor(h[s:s + NUM_PATCHES][None])[0]
    d = torch.sort(lg[:, 0] - lg[:, 1], descending=True).values
    m.image_score_predictor.output_mlp[4].bias[0] -= float(d[k]) - IMAGE_BOUNDARY_D
    text = torch.cat([h[:s], h[s + NUM_PATCHES:]])
    lg = m.output_text_score_predictor(text)
    m.output_text_score_predictor.output_mlp[7].bias[0] -= float((lg[:, 0] - lg[:, 1]).median())


def build_random_model(seed, case0, pixel_values0):
    torch.manual_seed(seed)
    m = DynamicLlava(SPARSE_CONFIG)
    base.randomise(m.llava, seed)
    with torch.no_grad():
        m.llava.lm_head.weight.mul_(LM_HEAD_EXTRA_GAIN)
    g = torch.Generator().manual_seed(seed + 100000)
    randomise_predictor(m.image_score_predictor, g)
    randomise_predictor(m.output_text_score_predictor, g)
    round_to_storage(m)
    calibrate_predictors(m, case0, pixel_values0)
    round_to_storage(m)
    return m


# --------------------------------------------------------------------------------------------
# Reference forward pieces
# --------------------------------------------------------------------------------------------
class GatedCache:
    """Per-layer K/V lists with the method transformers' LlamaAttention calls (`update`).

    update() returns cache ++ new (the new token always attends to itself) and stores the new
    K/V only when `append[layer]` is True (the output-text gate, DYNAMIC_LLAVA.md section 4)."""

    def __init__(self, n_layers):
        self.k = [None] * n_layers
        self.v = [None] * n_layers
        self.append = [True] * n_layers

    def update(self, k, v, layer_idx, cache_kwargs=None):
        if self.k[layer_idx] is not None:
            k = torch.cat([self.k[layer_idx], k], dim=-2)
            v = torch.cat([self.v[layer_idx], v], dim=-2)
        if self.append[layer_idx]:
            self.k[layer_idx], self.v[layer_idx] = k, v
        return k, v

    def cells(self):
        return [int(k.shape[-2]) for k in self.k]


def causal_mask(n):
    m = torch.full((n, n), float("-inf")).triu(1)
    return m[None, None]


class Ref:
    def __init__(self, model):
        self.m = model
        self.lm = model.lm
        self.l = model.sc["sparse_layer"]

    def embed_prompt(self, case, pixel_values):
        vis = self.m.llava.model.vision_tower(pixel_values, output_hidden_states=True)
        feats = vis.hidden_states[-2][:, 1:]
        img = self.m.llava.model.multi_modal_projector(feats)[0]
        emb = self.lm.embed_tokens
        before = emb(torch.tensor(case["ids_before_image"]))
        after = emb(torch.tensor(case["ids_after_image"]))
        return torch.cat([before, img, after]), len(case["ids_before_image"])

    def layer(self, i, h, pos, cache=None, mask="causal"):
        """Decoder layer i on rows h [N, H] at RoPE positions pos [N]; causal by row order."""
        cos, sin = self.lm.rotary_emb(h[None], pos[None])
        am = causal_mask(h.shape[0]) if mask == "causal" else None
        return self.lm.layers[i](h[None], attention_mask=am, position_ids=pos[None], past_key_values=cache,
                                 position_embeddings=(cos, sin))[0]

    def logits(self, h_last):
        return self.m.llava.lm_head(self.lm.norm(h_last))

    def image_decision(self, h, s):
        """Image predictor at the sparse layer: logits [576, 2], kept indices (ascending) [k]."""
        logits = self.m.image_score_predictor(h[s:s + NUM_PATCHES][None])[0]
        score = F.log_softmax(logits, dim=-1)[:, 0]
        k = int(NUM_PATCHES * self.m.sc["vision_keep_rate"])
        keep = torch.sort(torch.topk(score, k).indices).values
        return logits, score, keep

    def gate(self, h):
        """Output-text predictor: logits [.., 2]; keep iff logit0 > logit1 (a tie drops)."""
        lg = self.m.output_text_score_predictor(h)
        return lg, lg[..., 0] > lg[..., 1]

    # ---- dynamic, with KV cache --------------------------------------------------------------
    def dynamic_prefill(self, emb, s):
        T = emb.shape[0]
        cache = GatedCache(N_LAYERS)
        h, pos = emb, torch.arange(T)
        out = {"hidden": []}
        for i in range(N_LAYERS):
            if i == self.l:
                out["sparse_layer_input"] = h
                out["image_logits"], out["image_score"], keep = self.image_decision(h, s)
                rows = torch.cat([torch.arange(s), s + keep, torch.arange(s + NUM_PATCHES, T)])
                out["kept_image"], out["kept_positions"] = keep, pos[rows]
                h, pos = h[rows], pos[rows]
            h = self.layer(i, h, pos, cache)
            out["hidden"].append(h)
        out["logits"] = self.logits(h[-1])
        return out, cache

    def dynamic_decode(self, cache, tok, p):
        h, pos = self.lm.embed_tokens(torch.tensor([tok])), torch.tensor([p])
        gate_logits = keep = None
        for i in range(N_LAYERS):
            if i == self.l:
                gate_logits, keep = self.gate(h[0])
                for j in range(self.l, N_LAYERS):
                    cache.append[j] = bool(keep)
            h = self.layer(i, h, pos, cache, mask=None)
        for j in range(N_LAYERS):
            cache.append[j] = True
        return self.logits(h[-1]), gate_logits, bool(keep)

    def run_dynamic(self, emb, s):
        T = emb.shape[0]
        pre, cache = self.dynamic_prefill(emb, s)
        logits, gl, gk = [pre["logits"]], [], []
        for j in range(1, N_DYNAMIC_STEPS):
            tok = int(logits[-1].argmax())
            lg, g, k = self.dynamic_decode(cache, tok, T + j - 1)
            logits.append(lg)
            gl.append(g)
            gk.append(k)
        step_logits = torch.stack(logits)
        return {
            "pre": pre,
            "step_logits": step_logits,
            "greedy": step_logits.argmax(-1),
            "gate_logits": torch.stack(gl),
            "gate_keep": torch.tensor(gk, dtype=torch.int64),
            "cells": cache.cells(),
        }

    # ---- dynamic, without KV cache (recompute every step) ------------------------------------
    def nocache_step(self, emb, s, gen):
        """One recompute over prompt ++ gen; returns logits at the last row and the decisions."""
        T, j = emb.shape[0], len(gen)
        h = torch.cat([emb, self.lm.embed_tokens(torch.tensor(gen, dtype=torch.long))]) if j else emb
        pos = torch.arange(T + j)
        info = {}
        for i in range(N_LAYERS):
            if i == self.l:
                _, _, keep_img = self.image_decision(h, s)
                info["kept_image"] = keep_img
                gated = h[T:T + j - 1] if j >= 2 else h[T:T]  # generated tokens except the newest
                glog, gpos = self.gate(gated)
                k = int(gpos.sum())
                kept = torch.sort(torch.topk(glog[:, 0], k).indices).values if k else torch.zeros(0, dtype=torch.long)
                info.update(gate_logits=glog, gate_positive=gpos, kept_gen=kept)
                rows = torch.cat([torch.arange(s), s + keep_img, torch.arange(s + NUM_PATCHES, T), T + kept,
                                  torch.arange(T + j - 1, T + j) if j >= 1 else torch.zeros(0, dtype=torch.long)])
                h, pos = h[rows], pos[rows]
            h = self.layer(i, h, pos)
        return self.logits(h[-1]), info

    def run_nocache(self, emb, s):
        gen, logits, infos = [], [], []
        for _ in range(N_NOCACHE_STEPS):
            lg, info = self.nocache_step(emb, s, gen)
            logits.append(lg)
            infos.append(info)
            gen.append(int(lg.argmax()))
        step_logits = torch.stack(logits)
        return {"step_logits": step_logits, "greedy": step_logits.argmax(-1), "infos": infos}

    # ---- FastV (training-free baseline) -----------------------------------------------------
    def run_fastv(self, emb, s):
        T = emb.shape[0]
        n_keep = round(NUM_PATCHES * (1 - FASTV_R))
        cache = GatedCache(N_LAYERS)
        captured = {}
        hook = self.lm.layers[FASTV_K - 1].self_attn.register_forward_hook(
            lambda _m, _i, o: captured.__setitem__("w", o[1]))
        h, pos = emb, torch.arange(T)
        for i in range(N_LAYERS):
            if i == FASTV_K:
                w = captured["w"][0].mean(dim=0)[T - 1, s:s + NUM_PATCHES]  # heads-mean, last prompt row
                keep = torch.sort(torch.topk(w, n_keep).indices).values
                rows = torch.cat([torch.arange(s), s + keep, torch.arange(s + NUM_PATCHES, T)])
                h, pos = h[rows], pos[rows]
            h = self.layer(i, h, pos, cache)
        hook.remove()
        logits = [self.logits(h[-1])]
        for j in range(1, N_FASTV_STEPS):
            x, p = self.lm.embed_tokens(torch.tensor([int(logits[-1].argmax())])), torch.tensor([T + j - 1])
            for i in range(N_LAYERS):
                x = self.layer(i, x, p, cache, mask=None)
            logits.append(self.logits(x[-1]))
        step_logits = torch.stack(logits)
        return {"kept_image": keep, "attn": w, "step_logits": step_logits, "greedy": step_logits.argmax(-1),
                "cells": cache.cells()}

    # ---- full context (predictors off) -------------------------------------------------------
    def run_full(self, emb):
        T = emb.shape[0]
        cache = GatedCache(N_LAYERS)
        h, pos = emb, torch.arange(T)
        for i in range(N_LAYERS):
            h = self.layer(i, h, pos, cache)
        logits = [self.logits(h[-1])]
        for j in range(1, N_FULL_STEPS):
            x, p = self.lm.embed_tokens(torch.tensor([int(logits[-1].argmax())])), torch.tensor([T + j - 1])
            for i in range(N_LAYERS):
                x = self.layer(i, x, p, cache, mask=None)
            logits.append(self.logits(x[-1]))
        step_logits = torch.stack(logits)
        return {"step_logits": step_logits, "greedy": step_logits.argmax(-1)}

    # ---- training path: MaskedSoftmax over the full sequence (section 7) ---------------------
    def masked_layer(self, i, h, pos, keep, eps=1e-6):
        """Decoder layer i with the authors' softmax_with_policy: key-column keep mask with the
        diagonal forced on, attn = (e + eps/N) / (sum e + eps), in fp32 (eager math otherwise)."""
        layer = self.lm.layers[i]
        at = layer.self_attn
        n = h.shape[0]
        x = layer.input_layernorm(h)[None]
        q = at.q_proj(x).view(1, n, -1, at.head_dim).transpose(1, 2)
        k = at.k_proj(x).view(1, n, -1, at.head_dim).transpose(1, 2)
        v = at.v_proj(x).view(1, n, -1, at.head_dim).transpose(1, 2)
        cos, sin = self.lm.rotary_emb(x, pos[None])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k, v = repeat_kv(k, at.num_key_value_groups), repeat_kv(v, at.num_key_value_groups)
        s = (q @ k.transpose(-2, -1)) * at.scaling + causal_mask(n)
        policy = keep.to(torch.float32)[None, None, None, :]
        eye = torch.eye(n)[None, None]
        policy = policy + (1.0 - policy) * eye
        e = (s - s.max(dim=-1, keepdim=True).values).exp() * policy
        w = (e + eps / n) / (e.sum(dim=-1, keepdim=True) + eps)
        a = at.o_proj((w @ v).transpose(1, 2).reshape(1, n, -1))[0]
        h = h + a
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def run_masked_training(self, emb, s, gen_ids, image_keep, gen_keep):
        """Full sequence prompt ++ gen_ids; layers >= l use the keep mask (text always kept)."""
        T = emb.shape[0]
        h = torch.cat([emb, self.lm.embed_tokens(torch.tensor(gen_ids))])
        N = h.shape[0]
        pos = torch.arange(N)
        keep = torch.ones(N, dtype=torch.bool)
        keep[s:s + NUM_PATCHES] = False
        keep[s + image_keep] = True
        keep[T:] = gen_keep.bool()
        for i in range(N_LAYERS):
            h = self.layer(i, h, pos) if i < self.l else self.masked_layer(i, h, pos, keep)
        masked_logits = self.logits(h)
        # physical removal of the dropped tokens at layer l (same rows, original positions)
        hp = torch.cat([emb, self.lm.embed_tokens(torch.tensor(gen_ids))])
        for i in range(N_LAYERS):
            if i == self.l:
                rows = torch.nonzero(keep)[:, 0]
                hp, pos = hp[rows], pos[rows]
            hp = self.layer(i, hp, pos)
        removed_logits = self.logits(hp)
        return keep, masked_logits, removed_logits


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def greedy_margin(step_logits):
    t = step_logits.topk(2, dim=-1).values
    return float((t[:, 0] - t[:, 1]).min())


# --------------------------------------------------------------------------------------------
# Goldens for one case, with all checks
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def compute_case(model, case, pixel_values, with_masked):
    ref = Ref(model)
    emb, s = ref.embed_prompt(case, pixel_values)
    T = emb.shape[0]
    dyn = ref.run_dynamic(emb, s)
    noc = ref.run_nocache(emb, s)
    fv = ref.run_fastv(emb, s)
    full = ref.run_full(emb)
    pre = dyn["pre"]
    k_img = int(NUM_PATCHES * SPARSE_CONFIG["vision_keep_rate"])

    g = {
        "inputs_embeds": emb,
        "sparse_layer_input": pre["sparse_layer_input"],
        "image_predictor_logits": pre["image_logits"],
        "kept_image_indices": pre["kept_image"].to(torch.int64),
        "dynamic_kept_positions": pre["kept_positions"].to(torch.int64),
        "dynamic_step_logits": dyn["step_logits"],
        "dynamic_greedy_ids": dyn["greedy"].to(torch.int64),
        "dynamic_gate_logits": dyn["gate_logits"],
        "dynamic_gate_keep": dyn["gate_keep"],
        "dynamic_kv_cells_per_layer": torch.tensor(dyn["cells"], dtype=torch.int64),
        "nocache_step_logits": noc["step_logits"],
        "nocache_greedy_ids": noc["greedy"].to(torch.int64),
        "fastv_image_attention": fv["attn"],
        "fastv_kept_image_indices": fv["kept_image"].to(torch.int64),
        "fastv_step_logits": fv["step_logits"],
        "fastv_greedy_ids": fv["greedy"].to(torch.int64),
        "fastv_kv_cells_per_layer": torch.tensor(fv["cells"], dtype=torch.int64),
        "full_step_logits": full["step_logits"],
        "full_greedy_ids": full["greedy"].to(torch.int64),
    }
    for i, hid in enumerate(pre["hidden"]):
        g[f"dynamic_hidden_after_layer_{i}"] = hid
    kept = torch.full((N_NOCACHE_STEPS, N_NOCACHE_STEPS), -1, dtype=torch.int64)
    nlog = torch.zeros((N_NOCACHE_STEPS, N_NOCACHE_STEPS - 1, 2))
    for j, info in enumerate(noc["infos"]):
        kept[j, : len(info["kept_gen"])] = info["kept_gen"]
        nlog[j, : info["gate_logits"].shape[0]] = info["gate_logits"]
    g["nocache_kept_generated"] = kept
    g["nocache_gate_logits"] = nlog

    # ---------------- decision robustness and non-triviality (reasons -> reseed) -------------
    reasons = []
    sc = torch.sort(pre["image_score"], descending=True).values
    img_gap = float(sc[k_img - 1] - sc[k_img])
    if img_gap < MIN_IMAGE_GAP:
        reasons.append(f"image score gap {img_gap:.2e}")
    gl = dyn["gate_logits"]
    gate_margin = float((gl[:, 0] - gl[:, 1]).abs().min())
    if gate_margin < MIN_GATE_MARGIN:
        reasons.append(f"gate margin {gate_margin:.2e}")
    n_keep = int(dyn["gate_keep"].sum())
    if n_keep in (0, len(dyn["gate_keep"])):
        reasons.append(f"gate keeps {n_keep}/{len(dyn['gate_keep'])}")
    nc_margin, nc_gap, nc_mixed, nc_differs = float("inf"), float("inf"), False, []
    for j, info in enumerate(noc["infos"]):
        lg = info["gate_logits"]
        if lg.shape[0] == 0:
            continue
        nc_margin = min(nc_margin, float((lg[:, 0] - lg[:, 1]).abs().min()))
        k = len(info["kept_gen"])
        if 0 < k < lg.shape[0]:
            nc_mixed = True
            srt = torch.sort(lg[:, 0], descending=True).values
            nc_gap = min(nc_gap, float(srt[k - 1] - srt[k]))
        if not torch.equal(info["kept_gen"], torch.nonzero(info["gate_positive"])[:, 0]):
            nc_differs.append(j)
    if nc_margin < MIN_GATE_MARGIN:
        reasons.append(f"no-cache gate margin {nc_margin:.2e}")
    if nc_gap < MIN_TOPK_GAP:
        reasons.append(f"no-cache top-k gap {nc_gap:.2e}")
    if not nc_mixed:
        reasons.append("no-cache never keeps some and drops others")
    wsrt = torch.sort(fv["attn"], descending=True).values
    n_fv = len(fv["kept_image"])
    fv_gap = float((wsrt[n_fv - 1] - wsrt[n_fv]) / wsrt[n_fv - 1])
    if fv_gap < MIN_FASTV_REL_GAP:
        reasons.append(f"fastv relative gap {fv_gap:.2e}")
    margins = {m: greedy_margin(g[f"{m}_step_logits"]) for m in ("dynamic", "nocache", "fastv", "full")}
    for m, v in margins.items():
        if v < MIN_GREEDY_MARGIN:
            reasons.append(f"{m} greedy margin {v:.2e}")
        ids = g[f"{m}_greedy_ids"].tolist()
        if set(ids) & base.FORBIDDEN_GREEDY:
            reasons.append(f"{m} greedy ids contain pad/bos/eos/999")
        if len(set(ids)) < MIN_DISTINCT_GREEDY:
            reasons.append(f"{m} greedy ids have {len(set(ids))} distinct tokens")
    for name, v in g.items():
        if v.is_floating_point() and (not torch.isfinite(v).all() or v.abs().max() > MAX_ABS):
            reasons.append(f"{name} not finite or too large")
    stats = {
        "T": T, "pruned_T": int(pre["hidden"][-1].shape[0]), "image_score_gap": img_gap,
        "gate_margin": gate_margin, "gate_kept": n_keep, "nocache_gate_margin": nc_margin,
        "nocache_topk_gap": nc_gap, "nocache_steps_topk_differs_from_gate_set": nc_differs,
        "fastv_rel_gap": fv_gap, "greedy_margins": margins,
    }
    if reasons:
        return None, stats, reasons

    # ---------------- consistency checks (must hold for any seed; failures abort) ------------
    assert k_img == 115 and len(pre["kept_image"]) == 115 and n_fv == 144
    assert torch.equal(pre["kept_positions"][s:s + k_img], s + pre["kept_image"])
    assert dyn["cells"] == [T + N_DYNAMIC_STEPS - 1] * 2 + [T - NUM_PATCHES + k_img + n_keep] * 2
    assert fv["cells"] == [T + N_FASTV_STEPS - 1] * 2 + [T - NUM_PATCHES + n_fv + N_FASTV_STEPS - 1] * 2
    # no-cache step 0 is the dynamic prefill (no duplicated token); image decisions identical
    assert rel(noc["step_logits"][0], dyn["step_logits"][0]) <= TOL
    for info in noc["infos"]:
        assert torch.equal(info["kept_image"], pre["kept_image"])
    # While the ids agree: the no-cache gate logits equal the cached ones (layers < l see the whole
    # context in both modes), and no-cache step j equals cached step j whenever the no-cache kept
    # set is the cached mode's gate-positive set (always true at steps 0..2).
    agree_steps = []
    dg, ng = dyn["greedy"].tolist(), noc["greedy"].tolist()
    for j, info in enumerate(noc["infos"]):
        if ng[:j] != dg[:j]:
            break
        if j >= 2:
            assert rel(info["gate_logits"], dyn["gate_logits"][: j - 1]) <= TOL
        kv_set = torch.nonzero(dyn["gate_keep"][: max(j - 1, 0)])[:, 0]
        if torch.equal(info["kept_gen"], kv_set):
            assert rel(noc["step_logits"][j], dyn["step_logits"][j]) <= TOL, f"step {j}"
            agree_steps.append(j)
    assert agree_steps[:3] == [0, 1, 2], agree_steps
    stats["nocache_equals_cached_at_steps"] = agree_steps
    # FastV's layers < K and the full model coincide; full-context prefill equals HF LLaVA
    hf = model.llava(input_ids=torch.tensor([base.full_ids(case)]), pixel_values=pixel_values, use_cache=False)
    assert rel(hf.logits[0, -1], full["step_logits"][0]) <= TOL
    gen = full["greedy"].tolist()
    hf2 = model.llava(input_ids=torch.tensor([base.full_ids(case, gen[:-1])]), pixel_values=pixel_values,
                      use_cache=False)
    assert rel(hf2.logits[0, T - 1:], full["step_logits"]) <= TOL
    stats["hf_full_context_rel_diff"] = rel(hf2.logits[0, T - 1:], full["step_logits"])

    # ---------------- training-path equivalence (section 7) ----------------------------------
    gen15 = dyn["greedy"][: N_DYNAMIC_STEPS - 1].tolist()
    keep, masked, removed = ref.run_masked_training(emb, s, gen15, pre["kept_image"], dyn["gate_keep"])
    rows = torch.nonzero(keep)[:, 0]
    d_removed = rel(masked[rows], removed)
    d_cached = rel(masked[T - 1:], dyn["step_logits"])
    assert d_removed <= TOL, d_removed
    assert d_cached <= TOL, d_cached
    stats["masked_vs_removed_rel_diff"] = d_removed
    stats["masked_vs_cached_rel_diff"] = d_cached
    if with_masked:
        g["masked_training_input_ids"] = torch.tensor(
            case["ids_before_image"] + [-1] * NUM_PATCHES + case["ids_after_image"] + gen15, dtype=torch.int64)
        g["masked_training_keep_mask"] = keep.to(torch.int64)
        g["masked_training_logits_kept"] = masked[rows]
    return {k: v.clone().contiguous() for k, v in g.items()}, stats, []


# --------------------------------------------------------------------------------------------
# Writing and reloading the checkpoint
# --------------------------------------------------------------------------------------------
def write_model(model, d):
    clip_dir = os.path.join(d, "clip")
    os.makedirs(clip_dir, exist_ok=True)
    lm, clip = {}, {}
    for k, v in model.state_dict().items():
        comp, nk = orig_key(k)
        if comp == "lm":
            lm[nk] = v.detach().to(torch.float16).contiguous()
        else:
            clip[nk] = v.detach().to(torch.bfloat16).contiguous()
    save_file(lm, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    save_file(clip, os.path.join(clip_dir, "model.safetensors"), metadata={"format": "pt"})

    cfg = LlamaConfig(num_key_value_heads=NUM_KV_HEADS, **TEXT).to_dict()
    generic = set(PretrainedConfig().to_dict()) - {
        "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings", "architectures"}
    cfg = {k: v for k, v in cfg.items() if k not in generic}
    for k in ("dtype", "torch_dtype", "transformers_version"):
        cfg.pop(k, None)
    cfg.update({
        "_name_or_path": MODEL_NAME,
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama",
        "torch_dtype": "float16",
        "transformers_version": transformers.__version__,
        "mm_vision_tower": "clip",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_projector_type": "mlp2x_gelu",
        "mm_hidden_size": base.VISION["hidden_size"],
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
        "sparse_config": SPARSE_CONFIG,
    })
    base.write_json(os.path.join(d, "config.json"), cfg)
    vcfg = CLIPVisionConfig(**base.VISION)
    vcfg.architectures = ["CLIPVisionModel"]
    vcfg.dtype = torch.bfloat16
    vcfg.save_pretrained(clip_dir)
    base.image_processor().save_pretrained(clip_dir)


@torch.no_grad()
def reload_model(d):
    """Rebuild the model from the files only, as a loader would (known sparse_config keys only)."""
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "llava_llama"
    known = {k: cfg["sparse_config"][k] for k in SPARSE_CONFIG if k != "maskclip_dummy"}
    model = DynamicLlava(dict(known))
    for k in TEXT:
        assert cfg[k] == TEXT[k], k
    clip_model = CLIPVisionModel.from_pretrained(os.path.join(d, cfg["mm_vision_tower"]), dtype=torch.float32,
                                                 attn_implementation="eager", local_files_only=True)
    lm = load_file(os.path.join(d, "model.safetensors"))
    assert all(v.dtype == torch.float16 for v in lm.values())
    csd = clip_model.state_dict()
    sd = {}
    for k in model.state_dict():
        comp, nk = orig_key(k)
        sd[k] = (lm.pop(nk) if comp == "lm" else csd[nk]).to(torch.float32)
    assert not lm, f"unused keys {sorted(lm)}"
    model.load_state_dict(sd, strict=True)
    model.eval()
    return model


def predictor_key_table(model):
    return {("model." + k): list(v.shape) for k, v in model.state_dict().items() if not k.startswith("llava.")}


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    repo = os.path.dirname(os.path.dirname(here))
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(repo, "Tests", "EngineTests", "Fixtures"))
    ap.add_argument("--inputs", default=os.path.join(repo, "Tests", "EngineTests", "Fixtures", "goldens"),
                    help="directory holding inputs.json and inputs.safetensors (read only)")
    ap.add_argument("--authors-src", help="optional: checkout of Osilly/dynamic_llava; after writing, "
                    "compare the goldens with the authors' model code (check_dynamic_against_authors.py)")
    ap.add_argument("--authors-git", help="optional: same, from a git directory of Osilly/dynamic_llava")
    args = ap.parse_args()
    with open(os.path.join(args.inputs, "inputs.json")) as f:
        cases = json.load(f)["cases"]
    pixels = load_file(os.path.join(args.inputs, "inputs.safetensors"))
    gold_out = os.path.join(args.out, "goldens")

    for attempt in range(MAX_ATTEMPTS):
        seed = SEED_MODEL + attempt
        model = build_random_model(seed, cases[0], pixels["pixel_values_0"])
        goldens, stats, reasons = [], [], []
        for k, case in enumerate(cases):
            g, st, why = compute_case(model, case, pixels[f"pixel_values_{k}"], with_masked=(k == 0))
            if why:
                reasons = [f"case {k}: {w}" for w in why]
                break
            goldens.append(g)
            stats.append(st)
        if not reasons:
            break
        print(f"seed {seed} rejected: {'; '.join(reasons)}")
    else:
        sys.exit(f"no acceptable seed in {MAX_ATTEMPTS} attempts")
    print(f"seed {seed} accepted")

    mdir = os.path.join(args.out, "models", MODEL_NAME)
    write_model(model, mdir)
    reloaded = reload_model(mdir)
    for k, case in enumerate(cases):
        g2, _, why = compute_case(reloaded, case, pixels[f"pixel_values_{k}"], with_masked=(k == 0))
        assert not why
        for name, v in goldens[k].items():
            assert torch.equal(v, g2[name]), f"reload mismatch case{k} {name}"
    print(f"reload from {mdir}: goldens reproduced bit-exactly")

    gdir = os.path.join(gold_out, MODEL_NAME)
    os.makedirs(gdir, exist_ok=True)
    for k, g in enumerate(goldens):
        save_file(g, os.path.join(gdir, f"case{k}.safetensors"), metadata={"format": "pt"})
        side = {
            "schema": "dllava-dynamic-goldens/1",
            "model": f"models/{MODEL_NAME}",
            "seed": seed,
            "case": k,
            "tensors": {n: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)}
                        for n, v in sorted(g.items())},
            "decisions": {
                "kept_image_indices": g["kept_image_indices"].tolist(),
                "dynamic_greedy_ids": g["dynamic_greedy_ids"].tolist(),
                "dynamic_gate_keep": g["dynamic_gate_keep"].tolist(),
                "dynamic_kv_cells_per_layer": g["dynamic_kv_cells_per_layer"].tolist(),
                "nocache_greedy_ids": g["nocache_greedy_ids"].tolist(),
                "nocache_kept_generated": [[i for i in r if i >= 0] for r in g["nocache_kept_generated"].tolist()],
                "fastv_kept_image_indices": g["fastv_kept_image_indices"].tolist(),
                "fastv_greedy_ids": g["fastv_greedy_ids"].tolist(),
                "fastv_kv_cells_per_layer": g["fastv_kv_cells_per_layer"].tolist(),
                "full_greedy_ids": g["full_greedy_ids"].tolist(),
            },
            "checks": stats[k],
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        }
        base.write_json(os.path.join(gdir, f"case{k}.json"), side)
        print(f"case{k}: " + json.dumps(side["decisions"] | {"kept_image_indices": "..."}))
        print(f"case{k} checks: " + json.dumps(stats[k]))

    print("predictor keys:")
    for k, shp in predictor_key_table(model).items():
        print(f"  {k} {shp}")
    print("files:")
    for root in (mdir, gdir):
        for r, _d, files in sorted(os.walk(root)):
            for f in sorted(files):
                p = os.path.join(r, f)
                print(f"  {os.path.getsize(p):>9}  {base.sha256(p)[:16]}  {os.path.relpath(p, args.out)}")
    print(f"torch {torch.__version__}  transformers {transformers.__version__}")
    if args.authors_src or args.authors_git:
        import check_dynamic_against_authors as authors  # imports this module; only when asked
        authors.run(args.authors_src, args.authors_git, out=args.out, inputs=args.inputs)


if __name__ == "__main__":
    main()
