#!/usr/bin/env python3
"""Check the Dynamic-LLaVA goldens against the authors' own model code, batch 1.

Runs the language-model part of Osilly/dynamic_llava (DynamicLlamaModel from
llava/model/language_model/dynamic_modeling_llama.py with its DynamicCachePlus and predictor
blocks; SDPA attention, the only implementation that carries their sparsification) on the tiny
checkpoint models/dynamic_llava_tiny and compares with goldens/dynamic_llava_tiny/case<k>:

  - cached mode: prefill hidden states, image-predictor logits, kept RoPE positions at layer 2,
    logits of the prefill and of the 15 decode steps, output-gate logits and decisions, KV cells
    per layer at the end;
  - no-cache mode (their `use_cache=False` branch, `answer_indice` reset before each case, i.e.
    the never-reset quirk switched off): kept generated tokens and logits at steps 1..15. Step 0
    cannot match: their code appends a second copy of the last prompt token (the duplicated-token
    quirk, DYNAMIC_LLAVA.md section 4 "we differ"); the script prints how far off that makes it.
    Our no-cache step 0 equals the cached prefill (asserted by make_dynamic_goldens.py).

The authors' files are used in place (symlinked into a temporary package, never copied into
this repository). They were written for transformers 4.37.2 but import and run under 4.57.6.
The input embeddings (CLIP + projector splice) come from make_dynamic_goldens.Ref.embed_prompt.

Usage:
  git clone https://github.com/Osilly/dynamic_llava /tmp/dynamic_llava   # commit e1469bc
  python Scripts/reference/check_dynamic_against_authors.py --authors-src /tmp/dynamic_llava
  (or --authors-git DIR for a bare git directory: the files are read with `git show`)
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_dynamic_goldens as mdg  # noqa: E402

AUTHORS_COMMIT = "e1469bcba4be8a5ccc0fb2e792a33b406678ca7f"
FILES = ("dynamic_modeling_llama.py", "cache_utils.py", "custom_transformer_layer.py")
SUBDIR = "llava/model/language_model"
TOL = 1e-5


def import_authors(args):
    tmp = tempfile.mkdtemp(prefix="authors_dynamic_llava_")
    pkg = os.path.join(tmp, "authors_dynamic_llava")
    os.makedirs(pkg)
    for f in FILES:
        dst = os.path.join(pkg, f)
        if args.authors_src:
            os.symlink(os.path.join(os.path.abspath(args.authors_src), SUBDIR, f), dst)
        else:
            blob = subprocess.run(["git", "--git-dir", args.authors_git, "show", f"{args.commit}:{SUBDIR}/{f}"],
                                  check=True, capture_output=True).stdout
            with open(dst, "wb") as fh:
                fh.write(blob)
    open(os.path.join(pkg, "__init__.py"), "w").close()
    sys.path.insert(0, tmp)
    from authors_dynamic_llava import dynamic_modeling_llama as adm  # noqa: E402
    return adm


def build_authors_model(adm, mdir):
    from transformers import LlamaConfig
    with open(os.path.join(mdir, "config.json")) as f:
        cfg = json.load(f)
    lc = LlamaConfig(**{k: cfg[k] for k in mdg.TEXT}, num_key_value_heads=cfg["num_key_value_heads"])
    lc.sparse_config = cfg["sparse_config"]  # the unknown maskclip_dummy field rides along unused
    lc._attn_implementation = "sdpa"
    model = adm.DynamicLlamaModel(lc).eval()
    sd = load_file(os.path.join(mdir, "model.safetensors"))
    theirs = {k[len("model."):]: v.to(torch.float32) for k, v in sd.items()
              if k.startswith("model.") and not k.startswith("model.mm_projector.")}
    missing, unexpected = model.load_state_dict(theirs, strict=False)
    assert not unexpected, unexpected
    assert all("rotary_emb" in k for k in missing), missing
    lm_head = torch.nn.Linear(lc.hidden_size, lc.vocab_size, bias=False)
    lm_head.weight.data.copy_(sd["lm_head.weight"].to(torch.float32))
    lm_head.requires_grad_(False)
    return model, lm_head


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def indices(s, n):
    # as dynamic_llava_arch.prepare_inputs_labels_for_multimodal builds them at inference
    # (labels all IGNORE: the whole text after the image is "instruct", the answer is empty)
    return [{"system": [0, s], "image": [s, s + mdg.NUM_PATCHES], "instruct": [s + mdg.NUM_PATCHES, n],
             "answer": [n, n], "last_instruct": [s + mdg.NUM_PATCHES, n]}]


@torch.no_grad()
def check_case(am, lm_head, ours, case, pixel_values, g, k):
    ref = mdg.Ref(ours)
    emb, s = ref.embed_prompt(case, pixel_values)
    T = emb.shape[0]
    cap = {}
    hooks = [
        am.layers[2].register_forward_pre_hook(
            lambda _m, _a, kw: cap.__setitem__("pos", kw["position_ids"][0].clone()), with_kwargs=True),
        am.image_score_predictor.register_forward_hook(lambda _m, _i, o: cap.__setitem__("img", o[0].clone())),
        am.output_text_score_predictor.register_forward_hook(lambda _m, _i, o: cap.__setitem__("gate", o.clone())),
    ]
    worst = {}

    def cmp(name, a, b):
        d = rel(a, b)
        worst[name] = max(worst.get(name, 0.0), d)
        assert d <= TOL, f"case{k} {name}: rel {d:.2e}"

    # ---- cached mode -------------------------------------------------------------------------
    out = am(inputs_embeds=emb[None], input_embeds_indices=indices(s, T), use_cache=True, output_hidden_states=True)
    for i in range(3):  # hidden_states[i + 1] is the input of layer i + 1 = output of layer i
        cmp(f"dynamic_hidden_after_layer_{i}", out.hidden_states[i + 1][0], g[f"dynamic_hidden_after_layer_{i}"])
    cmp("sparse_layer_input", out.hidden_states[2][0], g["sparse_layer_input"])
    cmp("image_predictor_logits", cap["img"], g["image_predictor_logits"])
    assert torch.equal(cap["pos"], g["dynamic_kept_positions"]), "kept positions"
    logits = [lm_head(out.last_hidden_state[0, -1])]
    past, gate_logits = out.past_key_values, []
    for j in range(1, mdg.N_DYNAMIC_STEPS):
        tok = int(g["dynamic_greedy_ids"][j - 1])
        out = am(input_ids=torch.tensor([[tok]]), past_key_values=past, use_cache=True,
                 position_ids=torch.tensor([[T + j - 1]]))  # generate: attention_mask.cumsum - 1
        past = out.past_key_values
        logits.append(lm_head(out.last_hidden_state[0, -1]))
        gate_logits.append(cap["gate"][0, 0])
    cmp("dynamic_step_logits", torch.stack(logits), g["dynamic_step_logits"])
    assert torch.equal(torch.stack(logits).argmax(-1), g["dynamic_greedy_ids"])
    gl = torch.stack(gate_logits)
    cmp("dynamic_gate_logits", gl, g["dynamic_gate_logits"])
    assert torch.equal((gl[:, 0] > gl[:, 1]).to(torch.int64), g["dynamic_gate_keep"])
    cells = [int(kv[0].shape[2]) for kv in past[0]]
    assert cells == g["dynamic_kv_cells_per_layer"].tolist(), cells
    assert [int(x) for x in past[1]] == cells

    # ---- no-cache mode -----------------------------------------------------------------------
    am.answer_indice = None  # per-request state: the authors' model never resets it
    gen_all = g["nocache_greedy_ids"].tolist()
    dup_diff = None
    for j in range(mdg.N_NOCACHE_STEPS):
        gen = gen_all[:j]
        x = torch.cat([emb, ours.lm.embed_tokens(torch.tensor(gen, dtype=torch.long))]) if j else emb
        out = am(inputs_embeds=x[None], input_embeds_indices=indices(s, T + j), use_cache=False)
        lg = lm_head(out.last_hidden_state[0, -1])
        pos = cap["pos"]
        n_prompt = int(g["dynamic_kept_positions"].shape[0])
        assert torch.equal(pos[:n_prompt], g["dynamic_kept_positions"])
        if j == 0:
            # the duplicated token: the last prompt token appears twice, at the same position
            assert pos.tolist()[n_prompt:] == [T - 1], pos.tolist()[n_prompt - 2:]
            dup_diff = rel(lg, g["nocache_step_logits"][0])
            continue
        kept = [p - T for p in pos.tolist()[n_prompt:-1]]
        assert pos.tolist()[-1] == T + j - 1
        want = [i for i in g["nocache_kept_generated"][j].tolist() if i >= 0]
        assert kept == want, f"case{k} step {j}: kept {kept} != {want}"
        cmp("nocache_step_logits[1:]", lg, g["nocache_step_logits"][j])
        if j >= 2:
            cmp("nocache_gate_logits", cap["gate"][0], g["nocache_gate_logits"][j, : j - 1])
    for h in hooks:
        h.remove()
    return worst, dup_diff


def run(authors_src=None, authors_git=None, commit=AUTHORS_COMMIT, out=None, inputs=None):
    """Compare the goldens under `out` (a Fixtures directory) with the authors' code; raises on a mismatch."""
    here = os.path.dirname(os.path.abspath(__file__))
    fx = os.path.join(os.path.dirname(os.path.dirname(here)), "Tests", "EngineTests", "Fixtures")
    out = out or fx
    inputs = inputs or os.path.join(fx, "goldens")
    adm = import_authors(argparse.Namespace(authors_src=authors_src, authors_git=authors_git, commit=commit))
    mdir = os.path.join(out, "models", mdg.MODEL_NAME)
    gdir = os.path.join(out, "goldens", mdg.MODEL_NAME)
    am, lm_head = build_authors_model(adm, mdir)
    ours = mdg.reload_model(mdir)
    with open(os.path.join(inputs, "inputs.json")) as f:
        cases = json.load(f)["cases"]
    pixels = load_file(os.path.join(inputs, "inputs.safetensors"))
    for k, case in enumerate(cases):
        g = load_file(os.path.join(gdir, f"case{k}.safetensors"))
        worst, dup = check_case(am, lm_head, ours, case, pixels[f"pixel_values_{k}"], g, k)
        print(f"authors' code, case{k}: decisions identical; worst rel diffs: "
              + ", ".join(f"{n} {v:.1e}" for n, v in worst.items()))
        print(f"authors' code, case{k}: their no-cache step 0 (duplicated last prompt token) vs our step 0: "
              f"rel {dup:.2e}")

    # the never-reset quirk: case 1 decoded after case 0 without resetting answer_indice
    g1 = load_file(os.path.join(gdir, "case1.safetensors"))
    with torch.no_grad():
        emb, s = mdg.Ref(ours).embed_prompt(cases[1], pixels["pixel_values_1"])
        T, j = emb.shape[0], 5
        x = torch.cat([emb, ours.lm.embed_tokens(g1["nocache_greedy_ids"][:j])])
        am.answer_indice = int(load_file(os.path.join(gdir, "case0.safetensors"))
                               ["dynamic_kept_positions"].shape[0])  # left over from case 0
        out = am(inputs_embeds=x[None], input_embeds_indices=indices(s, T + j), use_cache=False)
    print(f"authors' code: never-reset quirk, case 1 no-cache step {j} with case 0's answer_indice: rel diff "
          f"{rel(lm_head(out.last_hidden_state[0, -1]), g1['nocache_step_logits'][j]):.2e}")


def main():
    ap = argparse.ArgumentParser()
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--authors-src", help="checkout of Osilly/dynamic_llava")
    src.add_argument("--authors-git", help="git directory of Osilly/dynamic_llava (read with git show)")
    ap.add_argument("--commit", default=AUTHORS_COMMIT)
    ap.add_argument("--out", help="Fixtures directory holding models/ and goldens/ (default: the repo's)")
    ap.add_argument("--inputs", help="directory with inputs.json / inputs.safetensors (default: the repo's)")
    args = ap.parse_args()
    run(args.authors_src, args.authors_git, args.commit, args.out, args.inputs)
    print("OK")


if __name__ == "__main__":
    main()
