"""A small LLaVA-1.5 with Dynamic-LLaVA predictors, for training on the synthetic scenes.

Architecture (DYNAMIC_LLAVA.md sections 1 and 3), built from transformers modules so that the
export is exactly the original Dynamic-LLaVA layout:
  vision      transformers CLIPVisionModel (quick_gelu, pre-LN); features = hidden_states[-2]
              without CLS, computed by running all encoder layers but the last (the last layer
              is part of the checkpoint, as in CLIP ViT-L, but never used and never trained)
  projector   mlp2x_gelu: Linear(vision hidden -> H), exact GELU, Linear(H -> H)
  llm         transformers LlamaForCausalLM (RMSNorm 1e-5, RoPE 10000, SwiGLU, untied lm_head)
  predictors  ImagePredictor (`model.image_score_predictor`) and OutputTextPredictor
              (`model.output_text_score_predictor`), module names and shapes as the authors'
              VisionPredictor / TextPredictor (Osilly/dynamic_llava,
              llava/model/language_model/dynamic_modeling_llama.py), written here from the spec.

Sequence layout of every sample: [prefix | N image embeddings | suffix], where the prefix
(BOS, system prompt, "USER:") is identical for every sample, so the image span is the same for
every row; suffixes are right-padded.

Training forward (section 7): stage 1 is plain LLaVA (full attention). Stage 2 runs the
predictors on the hidden state entering layer l = sparse_layer, samples hard Gumbel-Softmax
keep decisions with straight-through gradients, and every layer >= l uses MaskedSoftmax with
that key-column mask (diagonal forced on, eps 1e-6, fp32).
"""

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AttentionInterface, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

MASKED_SOFTMAX_EPS = 1e-6
ATTN_IMPL = "dllava_masked"


# ------------------------------------------------------------------------------------------------
# Sizes

@dataclass
class ModelSize:
    image_size: int = 336
    patch_size: int = 28
    vision_hidden: int = 192
    vision_layers: int = 5           # including the unused last layer (features = layer -2)
    vision_heads: int = 4
    vision_mlp: int = 768
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 4
    ffn: int = 688
    max_positions: int = 2048
    # predictors (sparse_config d_model / nhead / dim_feedforward / num_layers)
    d_model: int = 128
    nhead: int = 4
    dim_feedforward: int = 512
    predictor_layers: int = 2

    @property
    def image_tokens(self):
        return (self.image_size // self.patch_size) ** 2


PRESETS = {
    # the smoke test: proves every stage, learns nothing useful
    "smoke": ModelSize(patch_size=28, vision_hidden=48, vision_layers=3, vision_heads=2, vision_mlp=96,
                       hidden=64, layers=3, heads=2, kv_heads=2, ffn=176, d_model=64, nhead=2,
                       dim_feedforward=128),
    # the model trained in ~90 minutes on 2 CPU cores (see README for the measured step times)
    "full": ModelSize(hidden=192, ffn=512),
    # wider LLM (hidden 256): about 1.4x the cost per step
    "wide": ModelSize(),
    # 576 image tokens (patch 14): about 4x the cost per step
    "full576": ModelSize(patch_size=14, hidden=192, ffn=512),
}


@dataclass
class SparseConfig:
    """`sparse_config` with the released field names (SparseArguments in train_sparse.py)."""
    use_vision_predictor: bool = True
    vision_keep_rate: float = 0.2
    use_text_predictor: bool = True
    use_output_text_predictor: bool = True
    output_text_keep_rate: float = 0.5
    output_text_len_for_training: int = 16
    use_instruct_predictor: bool = False
    instruct_keep_rate: float = 0.7
    instruct_len_for_training: int = 25
    sparse_layer: int = 2
    d_model: int = 128
    nhead: int = 4
    dim_feedforward: int = 512
    num_layers: int = 2
    mask_loss_weight: float = 100.0


def vision_config(s: ModelSize):
    return CLIPVisionConfig(
        image_size=s.image_size, patch_size=s.patch_size, hidden_size=s.vision_hidden,
        intermediate_size=s.vision_mlp, num_hidden_layers=s.vision_layers,
        num_attention_heads=s.vision_heads, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        num_channels=3, projection_dim=s.vision_hidden)


def text_config(s: ModelSize, vocab_size):
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=s.hidden, intermediate_size=s.ffn,
        num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
        rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=s.max_positions,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
        hidden_act="silu", attention_bias=False, mlp_bias=False)


# ------------------------------------------------------------------------------------------------
# MaskedSoftmax attention (section 7), plugged into transformers' Llama attention

def masked_attention(module, query, key, value, attention_mask, scaling, dropout=0.0,
                     keep_policy=None, **kwargs):
    """query [B, h, T, d], key/value [B, kv, T, d], attention_mask bool [B, 1, T, T] (True =
    may attend). keep_policy None: ordinary softmax attention (SDPA). keep_policy [B, T] float
    (1 keep, 0 drop; hard Gumbel decisions carrying straight-through gradients): MaskedSoftmax,
    exp(s - max) * policy with the diagonal forced on, (a + eps/N) / (sum + eps), in fp32.
    Returns ([B, T, h, d], None) like transformers' attention functions."""
    if attention_mask is None:  # called by transformers' own forward (e.g. generate): causal
        q, k = query.shape[-2], key.shape[-2]
        attention_mask = torch.ones(q, k, dtype=torch.bool, device=query.device).tril(k - q)[None, None]
    elif attention_mask.dtype != torch.bool:
        attention_mask = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    if keep_policy is None:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling)
    else:
        n = key.shape[-2]
        scores = (query @ key.transpose(-2, -1)).float() * scaling
        scores = scores.masked_fill(~attention_mask, float("-inf"))
        pol = keep_policy.float()[:, None, None, :]                      # [B, 1, 1, N]
        nq = query.shape[-2]                                             # queries are the last nq keys
        eye = (torch.arange(nq, device=pol.device)[:, None] + (n - nq)
               == torch.arange(n, device=pol.device)[None, :]).to(pol.dtype)[None, None]
        pol = pol + (1.0 - pol) * eye                                    # a token always sees itself
        a = (scores - scores.amax(dim=-1, keepdim=True)).exp() * pol
        a = (a + MASKED_SOFTMAX_EPS / n) / (a.sum(dim=-1, keepdim=True) + MASKED_SOFTMAX_EPS)
        out = a.to(query.dtype) @ value
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_IMPL, masked_attention)


# ------------------------------------------------------------------------------------------------
# Predictors (section 3). Names are the checkpoint's: down_mlp, transformer.N.{norm1, attn.qkv,
# attn.proj, norm2, mlp.fc1, mlp.fc2}, output_mlp.

class _Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)   # (3C, C)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):                                 # [B, N, C], no mask
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)      # scale 1/sqrt(head dim)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    """Pre-norm ViT block: x += proj(attn(qkv(LN1 x))); x += fc2(GELU(fc1(LN2 x)))."""

    def __init__(self, dim, heads, ffn):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim, ffn)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ImagePredictor(nn.Module):
    """`model.image_score_predictor`: [B, N, H] image hidden states at layer l -> logits
    [B, N, 2], channel 0 = keep. The last d/2 channels are replaced by their policy-weighted
    mean over the image tokens before the output MLP."""

    def __init__(self, hidden, d_model, nhead, dim_feedforward, num_layers):
        super().__init__()
        self.down_mlp = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, d_model), nn.GELU())
        self.transformer = nn.Sequential(*[_Block(d_model, nhead, dim_feedforward) for _ in range(num_layers)])
        self.output_mlp = nn.Sequential(
            nn.Linear(d_model, d_model // 2), nn.GELU(),
            nn.Linear(d_model // 2, d_model // 4), nn.GELU(),
            nn.Linear(d_model // 4, 2))

    def forward(self, x, policy=None):                  # policy [B, N, 1] or None (all ones)
        if policy is None:
            policy = torch.ones_like(x[..., :1])
        y = self.transformer(self.down_mlp(x) * policy)
        c = y.shape[-1] // 2
        glob = (y[..., c:] * policy).sum(dim=1, keepdim=True) / policy.sum(dim=1, keepdim=True)
        y = torch.cat([y[..., :c], glob.expand(-1, y.shape[1], -1)], dim=-1)
        return self.output_mlp(y)


class OutputTextPredictor(nn.Module):
    """`model.output_text_score_predictor`: per token [.., H] -> [.., 2], channel 0 = keep."""

    def __init__(self, hidden, d_model):
        super().__init__()
        self.output_mlp = nn.Sequential(
            nn.LayerNorm(hidden), nn.Linear(hidden, d_model), nn.GELU(),
            nn.Linear(d_model, d_model // 2), nn.GELU(),
            nn.Linear(d_model // 2, d_model // 4), nn.GELU(),
            nn.Linear(d_model // 4, 2))

    def forward(self, x):
        return self.output_mlp(x)


# ------------------------------------------------------------------------------------------------
# The model

class _PrefixKV:
    """Duck-typed transformers cache for the shared prefix: the prefix pass (batch 1) records
    each layer's K/V; afterwards update() prepends them, expanded to the batch, to the rows'."""

    def __init__(self):
        self.kv = {}
        self.batch = None

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        if self.batch is None:
            self.kv[layer_idx] = (key_states, value_states)
            return key_states, value_states
        pk, pv = self.kv[layer_idx]
        b = key_states.shape[0]
        return (torch.cat([pk.expand(b, -1, -1, -1), key_states], dim=2),
                torch.cat([pv.expand(b, -1, -1, -1), value_states], dim=2))


@dataclass
class Batch:
    """prefix [P] ids shared by all rows; pixels [B, 3, S, S] normalised; suffix [B, A] ids
    (right-padded with 0); suffix_valid [B, A] bool; labels [B, A] (-100 = no loss; label of
    suffix position j is the token at j, the model shifts); gate [B, A] bool: the last answer's
    positions (the output-token gate's span, section 7), whatever its length. patch_labels
    [B, 3, N] (kind, colour, size per image patch, 0 = background; scenes.patch_labels) or None:
    the vision probe's targets."""
    prefix: torch.Tensor
    pixels: torch.Tensor
    suffix: torch.Tensor
    suffix_valid: torch.Tensor
    labels: torch.Tensor
    gate: torch.Tensor
    patch_labels: torch.Tensor = None

    def to(self, device):
        return Batch(*[x.to(device) if x is not None else None for x in
                       (self.prefix, self.pixels, self.suffix, self.suffix_valid, self.labels, self.gate,
                        self.patch_labels)])


class SceneLlava(nn.Module):
    def __init__(self, size: ModelSize, vocab_size: int, sparse: SparseConfig):
        super().__init__()
        self.size = size
        self.sparse = sparse
        vc = vision_config(size)
        vc._attn_implementation = "sdpa"
        self.vision = CLIPVisionModel(vc)
        h = size.hidden
        self.projector = nn.Sequential(nn.Linear(size.vision_hidden, h), nn.GELU(), nn.Linear(h, h))
        tc = text_config(size, vocab_size)
        tc._attn_implementation = ATTN_IMPL
        self.llm = LlamaForCausalLM(tc)
        self.llm.config._attn_implementation = ATTN_IMPL
        self.image_score_predictor = ImagePredictor(h, sparse.d_model, sparse.nhead,
                                                    sparse.dim_feedforward, sparse.num_layers)
        self.output_text_score_predictor = OutputTextPredictor(h, sparse.d_model)

    # ---- pieces ----
    def image_features(self, pixels):
        """CLIP hidden_states[-2] without CLS: [B, N, vision_hidden]."""
        vm = self.vision.vision_model
        x = vm.pre_layrnorm(vm.embeddings(pixels))
        for layer in vm.encoder.layers[:-1]:
            x = layer(x, None, None)
            x = x[0] if isinstance(x, tuple) else x
        return x[:, 1:]

    def training_features(self, pixels):
        """image_features, without activations kept for backward when the tower is frozen (stage 2)."""
        if any(p.requires_grad for p in self.vision.parameters()):
            return self.image_features(pixels)
        with torch.no_grad():
            return self.image_features(pixels)

    def embed(self, batch: Batch, features, with_prefix=True):
        """[prefix |] projected image features | suffix embeddings."""
        emb = self.llm.model.embed_tokens
        b = batch.pixels.shape[0]
        parts = [self.projector(features), emb(batch.suffix)]
        if with_prefix:
            parts.insert(0, emb(batch.prefix)[None].expand(b, -1, -1))
        return torch.cat(parts, dim=1)

    def _mask(self, batch: Batch, t):
        """bool [B, 1, T, T]: causal, padded keys off, but every query sees itself."""
        b = batch.pixels.shape[0]
        p = t - batch.suffix.shape[1]
        dev = batch.suffix.device
        valid = torch.cat([torch.ones(b, p, dtype=torch.bool, device=dev), batch.suffix_valid], dim=1)
        causal = torch.ones(t, t, dtype=torch.bool, device=dev).tril()
        eye = torch.eye(t, dtype=torch.bool, device=dev)
        return (causal[None] & (valid[:, None, :] | eye[None]))[:, None]

    # ---- training forward ----
    def forward(self, batch: Batch, dynamic=False, tau=1.0, share_prefix=True, probe=None, probe_weight=1.0):
        """-> dict(loss, ce, image_keep, output_keep, image_mask_loss, output_mask_loss, and with a
        `probe` and batch.patch_labels: probe_loss, probe_kind_accuracy); loss = ce (+ stage 2's
        keep-rate terms) + probe_weight x probe_loss.
        share_prefix: the prefix (BOS, system prompt, "USER:") is the same for every row and
        precedes the image, so its hidden states and K/V are computed once (batch 1) and every
        row attends to them; identical results to share_prefix=False, about 20% fewer FLOPs."""
        b = batch.pixels.shape[0]
        p, n = batch.prefix.shape[0], self.size.image_tokens
        l = self.sparse.sparse_layer
        layers = self.llm.model.layers
        features = self.training_features(batch.pixels)
        if share_prefix:
            kv = _PrefixKV()
            hp = self.llm.model.embed_tokens(batch.prefix)[None]
            rope_p = self.llm.model.rotary_emb(hp, torch.arange(p, device=hp.device)[None])
            mask_p = torch.ones(p, p, dtype=torch.bool, device=hp.device).tril()[None, None]
            for layer in layers:
                hp = layer(hp, attention_mask=mask_p, position_embeddings=rope_p, past_key_values=kv)
                hp = hp[0] if isinstance(hp, tuple) else hp
            kv.batch = b
            h = self.embed(batch, features, with_prefix=False)      # [B, T - P, H]
            t = p + h.shape[1]
            o = 0                                                   # image offset inside h
            pos = torch.arange(p, t, device=h.device)[None]
            mask = self._mask(batch, t)[:, :, p:, :]
        else:
            kv = None
            h = self.embed(batch, features)
            t = h.shape[1]
            o = p
            pos = torch.arange(t, device=h.device)[None]
            mask = self._mask(batch, t)
        rope = self.llm.model.rotary_emb(h, pos)
        policy = None
        stats = {}
        for i, layer in enumerate(layers):
            if dynamic and i == l:
                policy, stats = self._decide(h, batch, o, p, n, tau)
            h = layer(h, attention_mask=mask, position_embeddings=rope, past_key_values=kv,
                      keep_policy=policy if i >= l else None)
            h = h[0] if isinstance(h, tuple) else h
        logits = self.llm.lm_head(self.llm.model.norm(h[:, o + n - 1:-1])).float()  # predicts suffix
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.labels.reshape(-1), ignore_index=-100)
        out = {"ce": ce, "loss": ce}
        if dynamic:
            w = self.sparse.mask_loss_weight
            out["loss"] = ce + w * (stats["image_mask_loss"] + stats["output_mask_loss"])
            out.update(stats)
        if probe is not None and batch.patch_labels is not None:
            probe_loss, kind_accuracy = probe(features, batch.patch_labels)
            out["loss"] = out["loss"] + probe_weight * probe_loss
            out["probe_loss"] = probe_loss
            out["probe_kind_accuracy"] = kind_accuracy
        return out

    def _decide(self, h, batch, o, p, n, tau):
        """Hard Gumbel-Softmax keep decisions at layer l (straight-through) -> policy [B, T] over
        all keys (prefix kept). h holds the image at [o, o + n) and the suffix after it."""
        sp = self.sparse
        b = h.shape[0]
        img_logits = self.image_score_predictor(h[:, o:o + n])
        img_keep = F.gumbel_softmax(F.log_softmax(img_logits.float(), dim=-1), tau=tau, hard=True)[..., 0]
        suffix = h[:, o + n:]
        out_logits = self.output_text_score_predictor(suffix)
        out_keep = F.gumbel_softmax(F.log_softmax(out_logits.float(), dim=-1), tau=tau, hard=True)[..., 0]
        span = batch.gate.sum(dim=1)                                   # [B]
        long_rows = span >= sp.output_text_len_for_training           # shorter answers keep all
        gated = batch.gate & long_rows[:, None]
        out_policy = torch.where(gated, out_keep, torch.ones_like(out_keep))
        policy = torch.cat([torch.ones(b, p, dtype=out_policy.dtype, device=h.device), img_keep, out_policy], dim=1)
        img_ratio = img_keep.mean(dim=1)
        image_mask_loss = ((sp.vision_keep_rate - img_ratio) ** 2).mean()
        out_ratio = (out_policy * batch.gate).sum(dim=1) / span.clamp(min=1)
        target = torch.where(long_rows, torch.full_like(out_ratio, sp.output_text_keep_rate), out_ratio.detach())
        output_mask_loss = ((target - out_ratio) ** 2).mean()
        n_long = int(long_rows.sum())
        return policy, {
            "image_mask_loss": image_mask_loss, "output_mask_loss": output_mask_loss,
            "image_keep": float(img_ratio.detach().mean()),
            "output_keep": float(out_ratio.detach()[long_rows].mean()) if n_long else float("nan"),
        }

    # ---- groups for the optimiser ----
    def predictor_parameters(self):
        return list(self.image_score_predictor.parameters()) + list(self.output_text_score_predictor.parameters())

    def base_parameters(self, include_vision=True):
        ps = list(self.projector.parameters()) + list(self.llm.parameters())
        if include_vision:
            ps += list(self.vision.parameters())
        return ps


class PatchProbe(nn.Module):
    """Stage 1's dense vision probe, a stand-in for the pretraining a CLIP tower comes with: a
    linear read-out of (kind, colour, size) of the object under each image patch from the features
    the projector sees (hidden_states[-2]). Its loss teaches the tower shapes directly, instead of
    through one caption token per object; the probe itself is not part of the checkpoint.
    classes: class counts per attribute, background (class 0) included."""

    def __init__(self, vision_hidden, classes, background_weight=0.2):
        super().__init__()
        self.classes = list(classes)
        self.read_out = nn.Linear(vision_hidden, sum(self.classes))
        self.background_weight = background_weight

    def forward(self, features, labels):
        """features [B, N, C], labels [B, 3, N] -> (mean cross-entropy over the attributes,
        kind accuracy on object patches)."""
        logits = self.read_out(features).float().split(self.classes, dim=-1)
        loss = 0.0
        for a, (lg, n) in enumerate(zip(logits, self.classes)):
            weight = torch.ones(n, device=lg.device)
            weight[0] = self.background_weight
            loss = loss + F.cross_entropy(lg.reshape(-1, n), labels[:, a].reshape(-1), weight=weight)
        on_object = labels[:, 0] > 0
        hits = (logits[0].argmax(dim=-1) == labels[:, 0])[on_object]
        accuracy = hits.float().mean() if hits.numel() else torch.tensor(float("nan"))
        return loss / len(self.classes), accuracy.detach()


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------------------
# Greedy generation for validation (no KV cache: the whole sequence is recomputed each step)

@torch.no_grad()
def generate(model, prefix, pixels, prompts, eos_id, max_new=64, mode="full", seed=0):
    """Greedy decoding of a batch. prefix [P]; pixels [B,3,S,S]; prompts: list of suffix id lists
    (instruction after the image, ending with "ASSISTANT:").
    mode "full": plain LLaVA. "dynamic": Dynamic-LLaVA inference (section 4): at layer l the top
    int(N x vision_keep_rate) image tokens by log_softmax channel 0 are kept, and every generated
    token except the newest is kept iff output gate logit0 > logit1; layers >= l see only kept keys
    (equivalent to pruning with original positions, up to the MaskedSoftmax eps).
    "random": the same image budget, chosen uniformly at random (seeded); no output gating.
    -> (list of generated id lists without EOS, stats dict with realised keep rates)."""
    model.eval()
    sp = model.sparse
    b = pixels.shape[0]
    dev = pixels.device
    emb = model.llm.model.embed_tokens
    img = model.projector(model.image_features(pixels))
    n = img.shape[1]
    p = prefix.shape[0]
    pre = emb(prefix)[None].expand(b, -1, -1)
    seqs = [list(x) for x in prompts]
    start = [len(x) for x in prompts]
    done = [False] * b
    k_img = int(n * sp.vision_keep_rate)
    gen = torch.Generator().manual_seed(seed)
    img_policy = None
    if mode == "random":
        img_policy = torch.zeros(b, n)
        for r in range(b):
            img_policy[r, torch.randperm(n, generator=gen)[:k_img]] = 1.0
        img_policy = img_policy.to(dev)
    out_kept, out_total = 0, 0
    for _ in range(max_new):
        a = max(len(s) for s in seqs)
        suffix = torch.zeros(b, a, dtype=torch.long)
        valid = torch.zeros(b, a, dtype=torch.bool)
        for r, s in enumerate(seqs):
            suffix[r, :len(s)] = torch.tensor(s)
            valid[r, :len(s)] = True
        suffix, valid = suffix.to(dev), valid.to(dev)
        h = torch.cat([pre, img, emb(suffix)], dim=1)
        t = h.shape[1]
        batch = Batch(prefix, pixels, suffix, valid, None, None)
        mask = model._mask(batch, t)
        rope = model.llm.model.rotary_emb(h, torch.arange(t, device=dev)[None])
        policy = None
        for i, layer in enumerate(model.llm.model.layers):
            if i == sp.sparse_layer and mode != "full":
                if mode == "dynamic":
                    score = F.log_softmax(model.image_score_predictor(h[:, p:p + n]).float(), dim=-1)[..., 0]
                    keep = score.topk(k_img, dim=1).indices
                    img_policy = torch.zeros(b, n, device=dev).scatter_(1, keep, 1.0)
                    gl = model.output_text_score_predictor(h[:, p + n:]).float()
                    gate_raw = gl[..., 0] > gl[..., 1]
                    out_policy = gate_raw.float()
                    for r in range(b):  # prompt tokens and the newest token are always kept
                        out_policy[r, :start[r]] = 1.0
                        out_policy[r, len(seqs[r]) - 1:] = 1.0
                else:
                    out_policy = torch.ones(b, a, device=dev)
                policy = torch.cat([torch.ones(b, p, device=dev), img_policy, out_policy], dim=1)
            h = layer(h, attention_mask=mask, position_embeddings=rope,
                      keep_policy=policy if policy is not None and i >= sp.sparse_layer else None)
            h = h[0] if isinstance(h, tuple) else h
        last = torch.tensor([p + n + len(s) - 1 for s in seqs], device=dev)
        logits = model.llm.lm_head(model.llm.model.norm(h[torch.arange(b, device=dev), last]))
        nxt = logits.argmax(dim=-1).tolist()
        for r in range(b):
            if not done[r]:
                seqs[r].append(nxt[r])
                done[r] = nxt[r] == eos_id
        if all(done):
            break
    if mode == "dynamic":  # realised output keep rate: gate decisions of the generated tokens
        for r in range(b):   # fed in the last forward, except the newest (always kept)
            fed = min(len(seqs[r]), a)
            dec = gate_raw[r, start[r]:fed - 1]
            out_kept += int(dec.sum())
            out_total += dec.numel()
    outs = [[x for x in s[st:] if x != eos_id] for s, st in zip(seqs, start)]
    stats = {"image_keep": (k_img / n) if mode != "full" else 1.0,
             "output_keep": (out_kept / out_total) if out_total else 1.0}
    return outs, stats
