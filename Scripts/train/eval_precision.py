#!/usr/bin/env python3
"""The bf16 quality gate (docs/CORRECTNESS.md, "Quality gates"): caption accuracy of the shipped
scene model with the Swift engine in f32 and in bf16 precision, full context and Dynamic-LLaVA, on the same test scenes
(score.py's caption metric, greedy, as eval_swift.py), plus how many captions are identical, the
largest difference between the two precisions' log-probabilities of the chosen token over the
steps before the greedy ids first differ, and that first differing step per caption.

With --quantized DIR (the model quantized by `dllava quantize`), the q8 quality gate
instead: the f16 model against the q8 one, both computed in f32 precision (the q8 layers in the
8-bit arithmetic), written to QUANTIZED.md and quantized.json.

Usage:  python Scripts/train/eval_precision.py [--count 100] [--out Jobs/models/dllava-scenes/eval] [--quantized DIR]
Needs numpy and Pillow (scenes.py renders the scenes) and a release build of dllava.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import scenes  # noqa: E402
import score  # noqa: E402

MODES = {"full": ["--sparsity", "full"], "dynamic": ["--sparsity", "dynamic"]}


def generate(args, image, model, precision, extra):
    cmd = [args.dllava, "generate", "--model", model, "--image", image, "--prompt", scenes.DESCRIBE, "--json",
           "--max-tokens", str(args.max_tokens), "--threads", str(args.threads), "--logprobs", "1",
           "--precision", precision] + extra
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
    return json.loads(p.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, "Jobs/models/dllava-scenes"))
    ap.add_argument("--dllava", default=os.path.join(ROOT, ".build/release/dllava"))
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--max-tokens", type=int, default=72)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(ROOT, "Jobs/models/dllava-scenes/eval"))
    ap.add_argument("--quantized", help="a q8 copy of --model: compare it with the f16 model instead of bf16 with f32")
    args = ap.parse_args()
    args.model = os.path.abspath(args.model)
    # name -> (model directory, precision); the first is the baseline.
    if args.quantized:
        variants = {"f16": (args.model, "f32"), "q8": (os.path.abspath(args.quantized), "f32")}
        title, stem, flag = "q8 quality gate", "QUANTIZED", f" --quantized {args.quantized}"
    else:
        variants = {"f32": (args.model, "f32"), "bf16": (args.model, "bf16")}
        title, stem, flag = "bf16 quality gate", "PRECISION", ""
    names = list(variants)
    base, other = names
    tmp = tempfile.mkdtemp(prefix="eval_precision_")
    t0 = time.time()
    rows = {(m, p): [] for m in MODES for p in names}
    identical = {m: 0 for m in MODES}
    max_logprob_difference = {m: 0.0 for m in MODES}
    divergences = {m: [] for m in MODES}
    for k in range(args.count):
        scene = scenes.make_scene(scenes.scene_index("test", k))
        png = os.path.join(tmp, f"test_{k:06d}.png")
        scenes.render(scene).save(png)
        for mode, extra in MODES.items():
            results = {p: generate(args, png, *variants[p], extra) for p in names}
            for p in names:
                rows[(mode, p)].append(score.score_caption(results[p]["text"], scene))
            a, b = results[base], results[other]
            if a["token_ids"] == b["token_ids"]:
                identical[mode] += 1
            # Steps where both runs chose the same token so far: compare that token's logprob.
            for step, (x, y) in enumerate(zip(a["token_ids"], b["token_ids"])):
                if x != y:
                    divergences[mode].append({"scene": k, "step": step})
                    break
                lx, ly = a["logprobs"][step][0]["logprob"], b["logprobs"][step][0]["logprob"]
                max_logprob_difference[mode] = max(max_logprob_difference[mode], abs(lx - ly))
    summary = {f"{m}/{p}": score.summarise(rows[(m, p)]) for m in MODES for p in names}
    lines = [f"# {title} on the shipped scene model", "",
             f"`python Scripts/train/eval_precision.py --count {args.count}{flag}` ({time.time() - t0:.0f} s, "
             f"{args.threads} thread(s), greedy, {args.max_tokens} tokens, test scenes 0..{args.count - 1}).", "",
             f"| mode | {base} caption object accuracy | {other} caption object accuracy | difference (points) | identical captions | max |logprob difference| of the chosen token before divergence | captions that diverge |",
             "|---|---|---|---|---|---|---|"]
    for m in MODES:
        f, b = summary[f"{m}/{base}"]["object_accuracy"], summary[f"{m}/{other}"]["object_accuracy"]
        lines.append(f"| {m} | {100 * f:.1f}% | {100 * b:.1f}% | {100 * (b - f):+.1f} | {identical[m]}/{args.count} | "
                     f"{max_logprob_difference[m]:.4f} | {len(divergences[m])} |")
    lines += ["", "First divergent steps (scene: step): " + "; ".join(
        f"{m}: " + (", ".join(f"{d['scene']}: {d['step']}" for d in divergences[m]) or "none") for m in MODES), ""]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{stem}.md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(args.out, f"{stem.lower()}.json"), "w") as f:
        json.dump({"summary": summary, "identical": identical, "max_logprob_difference": max_logprob_difference,
                   "divergences": divergences}, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
