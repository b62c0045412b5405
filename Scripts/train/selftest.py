#!/usr/bin/env python3
"""Fast checks of the training code's contracts (a few seconds on the CPU, tiny random model).

  python Scripts/train/selftest.py
"""

import os
import sys

import torch

import data
import scenes
import score
from export import checkpoint_key
from model import PRESETS, PatchProbe, SceneLlava, SparseConfig, generate, masked_attention

HERE = os.path.dirname(os.path.abspath(__file__))


def scenes_are_deterministic_and_splits_disjoint():
    a = scenes.make_scene(scenes.scene_index("test", 5))
    b = scenes.make_scene(scenes.scene_index("test", 5))
    assert a == b
    assert list(scenes.render(a).getdata())[:500] == list(scenes.render(b).getdata())[:500]
    assert scenes.split_of(scenes.scene_index("train", 999_999)) == "train"
    assert scenes.split_of(scenes.scene_index("test", 0)) == "test"


def captions_parse_back_to_their_scene():
    for i in range(200):
        s = scenes.make_scene(i)
        r = score.score_caption(scenes.caption(s), s)
        assert r["object_accuracy"] == 1.0 and r["exact"] == 1.0 and r["parsed"] == 1.0, (scenes.caption(s), r)
        for q, a, _ in scenes.questions(s):
            assert score.score_answer(a, a) == 1.0


def masked_softmax_with_all_kept_is_softmax_and_dropping_equals_masking():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 9, 4, generator=g) for _ in range(3))
    causal = torch.ones(9, 9, dtype=torch.bool).tril()[None, None].expand(2, 1, 9, 9)
    plain, _ = masked_attention(None, q, k, v, causal, 0.5)
    ones, _ = masked_attention(None, q, k, v, causal, 0.5, keep_policy=torch.ones(2, 9))
    assert (plain - ones).abs().max() < 1e-5
    pol = torch.ones(2, 9)
    pol[:, [2, 5]] = 0
    dropped, _ = masked_attention(None, q, k, v, causal, 0.5, keep_policy=pol)
    m = causal.clone()
    m[..., [2, 5]] = False
    m = m | torch.eye(9, dtype=torch.bool)  # a dropped token still sees itself
    ref, _ = masked_attention(None, q, k, v, m, 0.5)
    assert (dropped - ref).abs().max() < 1e-5


def prompt_tokens_match_llava_and_answers_carry_the_loss():
    tok = data.SceneTokenizer(os.path.join(HERE, "tokenizer", "tokenizer.model"))
    before, after = tok.prompt(scenes.DESCRIBE)
    assert before[0] == tok.bos and tok.bos not in before[1:] and tok.bos not in after
    s = scenes.make_scene(3)
    ids, labels, gate = data.build_suffix(tok, [(scenes.DESCRIBE, scenes.caption(s))])
    ans = [i for i, l in zip(ids, labels) if l != data.IGNORE]
    assert ans[-1] == tok.eos and tok.decode(ans) == scenes.caption(s)
    assert sum(gate) == len(ans) and gate[-len(ans):] == [True] * len(ans)
    ids2, labels2, gate2 = data.build_suffix(tok, [("How many shapes are there?", "Two"), ("Is there a red star?", "No")])
    assert sum(l != data.IGNORE for l in labels2) == len(tok.encode("Two")) + len(tok.encode("No")) + 2
    assert sum(gate2) == len(tok.encode("No")) + 1  # only the last answer is gated


def training_step_runs_in_both_stages_and_generation_modes_run():
    torch.manual_seed(0)
    tok = data.SceneTokenizer(os.path.join(HERE, "tokenizer", "tokenizer.model"))
    size = PRESETS["smoke"]
    m = SceneLlava(size, tok.vocab_size, SparseConfig(d_model=64, nhead=2, dim_feedforward=128,
                                                      output_text_len_for_training=8))
    batch = data.training_batch(tok, 0, 0, 3, 100)
    for dynamic in (False, True):
        out = m(batch, dynamic=dynamic, tau=0.5)
        out["loss"].backward()
        assert torch.isfinite(out["loss"])
    assert m.image_score_predictor.down_mlp[1].weight.grad.abs().sum() > 0
    px = batch.pixels[:2]
    for mode in ("full", "dynamic", "random"):
        outs, st = generate(m, torch.tensor(tok.prefix), px, [tok.prompt(scenes.DESCRIBE)[1]] * 2, tok.eos,
                            max_new=4, mode=mode)
        assert len(outs) == 2
        assert st["image_keep"] == (1.0 if mode == "full" else int(size.image_tokens * 0.2) / size.image_tokens)
    # every parameter has a checkpoint name in the original layout
    for name, _ in m.named_parameters():
        checkpoint_key(name)


def mirrored_rows_are_flipped_pictures_with_their_own_labels():
    for i in range(20):
        s = scenes.make_scene(i)
        m = scenes.mirror(s)
        assert scenes.mirror(m)["objects"] == s["objects"]
        # the same picture up to rasterisation (polygon edges may move by a pixel)
        assert ((scenes.object_mask(s)[:, ::-1] > 0) == (scenes.object_mask(m) > 0)).mean() > 0.995
        labels = scenes.patch_labels(s, 28)
        assert (data._mirrored_patch_labels(labels) == scenes.patch_labels(m, 28)).mean() > 0.98
        assert set(labels[0][labels[0] > 0]) <= {scenes.KINDS.index(o["kind"]) + 1 for o in s["objects"]}
    tok = data.SceneTokenizer(os.path.join(HERE, "tokenizer", "tokenizer.model"))
    batch = data.training_batch(tok, 0, 0, 5, 100, patch_size=28)
    assert torch.equal(batch.pixels[1], batch.pixels[0].flip(-1)) and batch.patch_labels.shape == (5, 3, 144)
    probe = PatchProbe(48, [len(scenes.KINDS) + 1, len(scenes.COLOURS) + 1, len(scenes.SIZES) + 1])
    m = SceneLlava(PRESETS["smoke"], tok.vocab_size, SparseConfig(d_model=64, nhead=2, dim_feedforward=128))
    out = m(data.training_batch(tok, 0, 0, 2, 100, patch_size=28), probe=probe)
    out["loss"].backward()
    assert out["loss"] > out["ce"] and probe.read_out.weight.grad.abs().sum() > 0
    assert m.vision.vision_model.embeddings.patch_embedding.weight.grad.abs().sum() > 0


def sharing_the_prefix_changes_nothing():
    torch.manual_seed(0)
    tok = data.SceneTokenizer(os.path.join(HERE, "tokenizer", "tokenizer.model"))
    m = SceneLlava(PRESETS["smoke"], tok.vocab_size, SparseConfig(d_model=64, nhead=2, dim_feedforward=128,
                                                                  output_text_len_for_training=8))
    batch = data.training_batch(tok, 0, 1, 3, 100)
    for dynamic in (False, True):
        res = []
        for share in (False, True):
            m.zero_grad()
            torch.manual_seed(7)  # same Gumbel noise
            out = m(batch, dynamic=dynamic, tau=0.5, share_prefix=share)
            out["loss"].backward()
            res.append((float(out["loss"]), m.llm.model.layers[0].self_attn.q_proj.weight.grad.clone(),
                        m.image_score_predictor.down_mlp[1].weight.grad.clone() if dynamic else None))
        (l0, g0, p0), (l1, g1, p1) = res
        assert abs(l0 - l1) < 1e-5 * max(1.0, abs(l0)), (dynamic, l0, l1)
        assert (g0 - g1).norm() <= 1e-4 * g0.norm(), (dynamic, float((g0 - g1).norm() / g0.norm()))
        if dynamic:
            assert (p0 - p1).norm() <= 1e-4 * p0.norm()


def main():
    torch.set_flush_denormal(True)
    tests = [scenes_are_deterministic_and_splits_disjoint, captions_parse_back_to_their_scene,
             masked_softmax_with_all_kept_is_softmax_and_dropping_equals_masking,
             prompt_tokens_match_llava_and_answers_carry_the_loss,
             training_step_runs_in_both_stages_and_generation_modes_run,
             mirrored_rows_are_flipped_pictures_with_their_own_labels, sharing_the_prefix_changes_nothing]
    for t in tests:
        t()
        print("ok", t.__name__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
