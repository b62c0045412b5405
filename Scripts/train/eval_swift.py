#!/usr/bin/env python3
"""Evaluates a scene model with the SWIFT engine (the `dllava generate` CLI) on test scenes: caption
and question accuracy (score.py's metrics) for full context, Dynamic-LLaVA, FastV and random
image dropping at the same image budget; the realised keep rates; kept-patch pictures; and,
optionally, a parity check of the full-context captions against the PyTorch reference
(eval_reference.py, which rebuilds the model from the same exported files). Writes RESULTS.md: the
scene model's evaluation with the Swift engine.

Modes (every call greedy):
  full     --sparsity full
  dynamic  --sparsity dynamic                                   (the model's gates, image keep 0.2)
  fastv    --sparsity fastv --vision-keep-rate R --fastv-layer K (R = 0.2, K = 2 of the 4 layers)
  random   --sparsity random --vision-keep-rate R --seed <scene position>
  dynamic-random-output   --sparsity dynamic --output-tokens random --output-keep-rate Q --seed <scene position>
                          (learned image gate; generated tokens' K/V kept at random with Q = the rate the
                          learned output gate realised on the same scene's caption: the same KV budget)
  dynamic-every-other     --sparsity dynamic --output-tokens every-other (learned image gate; the 1st,
                          3rd, ... generated token's K/V kept: the structured baseline at 50%)

Per scene: one caption ("Describe the image.") and every question scenes.questions() gives
(the first of them is the single question eval_reference.py asks). Realised keep rates:
image = image_tokens_kept / image_tokens_total; output (dynamic, captions) = generated tokens
whose K/V the gate kept in the layers after the sparse layer, from stats.kv_cells_per_layer:
(cells[last] - (prompt_tokens - image_tokens_total + image_tokens_kept)) / (cells[0] - prompt_tokens).

Writes to --out: RESULTS.md (tables, command, notes), results.json (summary and compact
per-scene records), kept_<index>.png (dynamic-mode kept image patches of the first --pictures
scenes: dropped patches dimmed, kept ones outlined).

Usage:  python Scripts/train/eval_swift.py [--count 100] [--reference] [--out Jobs/models/dllava-scenes/eval]
"""

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import scenes  # noqa: E402
import score  # noqa: E402

MODES = ["full", "dynamic", "fastv", "random", "dynamic-random-output", "dynamic-every-other"]
IMAGE_MODES = MODES[:4]
OUTPUT_MODES = ["dynamic", "dynamic-random-output", "dynamic-every-other"]
GRID = 12  # 144 image tokens = 12 x 12 patches of 28 px over the 336 x 336 image
PATCH = scenes.IMAGE_SIZE // GRID


def mode_args(mode, args, k, learned_output_rate):
    """CLI flags of a mode for scene position k; learned_output_rate: the rate the learned output
    gate realised on this scene's dynamic caption (the random output baseline's budget)."""
    if mode == "full":
        return ["--sparsity", "full"]
    if mode == "dynamic":
        return ["--sparsity", "dynamic"]
    if mode == "fastv":
        return ["--sparsity", "fastv", "--vision-keep-rate", str(args.keep), "--fastv-layer", str(args.fastv_layer)]
    if mode == "random":
        return ["--sparsity", "random", "--vision-keep-rate", str(args.keep), "--seed", str(args.seed + k)]
    if mode == "dynamic-random-output":
        return ["--sparsity", "dynamic", "--output-tokens", "random", "--output-keep-rate", f"{learned_output_rate:.6f}",
                "--seed", str(args.seed + k)]
    if mode == "dynamic-every-other":
        return ["--sparsity", "dynamic", "--output-tokens", "every-other"]
    raise ValueError(mode)


def generate(binary, args, image, prompt, max_tokens, extra):
    cmd = [binary, "generate", "--model", args.model, "--image", image, "--prompt", prompt, "--json",
           "--max-tokens", str(max_tokens), "--threads", str(args.threads)] + extra
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
    return json.loads(p.stdout)


def output_keep(stats):
    """(kept, total) generated-token K/V cells after the sparse layer, from kv_cells_per_layer."""
    cells = stats["kv_cells_per_layer"]
    prompt = stats["prompt_tokens"]
    generated = cells[0] - prompt
    prompt_last = prompt - stats["image_tokens_total"] + stats["image_tokens_kept"]
    return cells[-1] - prompt_last, generated


def picture(img, kept, path, colour=(255, 230, 0)):
    """Kept patches as they are, outlined; dropped patches blurred and dimmed (the blur only keeps
    the PNG small: the scenes' pixel noise does not compress); a 32-colour palette PNG."""
    arr = np.asarray(img, np.float32)
    dropped = np.asarray(img.filter(ImageFilter.GaussianBlur(3)), np.float32) * 0.35 + 20
    mask = np.zeros((GRID, GRID), bool)
    for i in kept:
        mask[i // GRID, i % GRID] = True
    big = np.kron(mask, np.ones((PATCH, PATCH), bool))
    out = Image.fromarray(np.clip(np.where(big[:, :, None], arr, dropped), 0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(out)
    for i in kept:
        r, c = divmod(i, GRID)
        d.rectangle([c * PATCH, r * PATCH, c * PATCH + PATCH - 1, r * PATCH + PATCH - 1], outline=colour, width=2)
    out.quantize(colors=32, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(path, optimize=True)


def object_patches(scene, min_fraction=0.1):
    """Set of patch indices at least `min_fraction` covered by a shape (render()'s geometry)."""
    cover = (scenes.object_mask(scene) > 0).reshape(GRID, PATCH, GRID, PATCH).mean(axis=(1, 3))
    return {int(i) for i in np.flatnonzero(cover.reshape(-1) >= min_fraction)}


def draw_pictures(records, count, out_dir):
    """kept_<index>.png for `count` scenes: the first scene with 1, 2, 3, 4 objects, then the next ones."""
    by_n, rest = {}, []
    for rec in records:
        n = len(scenes.make_scene(rec["index"])["objects"])
        if n not in by_n:
            by_n[n] = rec
        else:
            rest.append(rec)
    chosen = sorted([by_n[n] for n in sorted(by_n)][:count] + rest[:max(0, count - len(by_n))], key=lambda r: r["index"])
    done = []
    for rec in chosen:
        kept = rec["modes"]["dynamic"]["kept_image_indices"]
        if kept is None:
            print("warning: the CLI reports no kept_image_indices (built before fb67e87?): no picture")
            continue
        picture(scenes.render(scenes.make_scene(rec["index"])), kept, os.path.join(out_dir, f"kept_{rec['index']}.png"))
        done.append(rec["index"])
    return done


def pct(x):
    return f"{100 * x:.1f}%"


def run_reference(args, picked):
    """Full-context captions and first answers from eval_reference.py (PyTorch, same exported files)."""
    import torch
    import eval_reference
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    m = eval_reference.Exported(args.model)
    out = {}
    for k, scene in picked:
        img = scenes.render(scene)
        q, _, _ = scenes.questions(scene, k=1)[0]
        out[k] = {"caption": m.answer(img, scenes.DESCRIBE, max_new=args.max_tokens),
                  "answer": m.answer(img, q, max_new=args.question_max_tokens)}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, "Jobs/models/dllava-scenes"))
    ap.add_argument("--dllava", default=os.path.join(ROOT, ".build/release/dllava"),
                    help="the CLI (copied to a temporary directory first, so a rebuild during the run does not matter)")
    ap.add_argument("--split", default="test", choices=["val", "test"])
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--keep", type=float, default=0.2, help="image budget for FastV and random")
    ap.add_argument("--fastv-layer", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="random mode uses seed + scene position")
    ap.add_argument("--max-tokens", type=int, default=72, help="caption budget (eval_reference.py's 72)")
    ap.add_argument("--question-max-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pictures", type=int, default=4)
    ap.add_argument("--reference", action="store_true", help="also run eval_reference.py's model on the same scenes")
    ap.add_argument("--out", default=os.path.join(ROOT, "Jobs/models/dllava-scenes/eval"))
    ap.add_argument("--markdown-only", action="store_true",
                    help="no engine calls: rewrite RESULTS.md from --out's results.json")
    args = ap.parse_args()
    if args.markdown_only:
        with open(os.path.join(args.out, "results.json")) as f:
            saved = json.load(f)
        saved["meta"]["picture_scenes"] = draw_pictures(saved["scenes"], args.pictures, args.out)
        write_markdown(saved["meta"], saved["summary"], saved["parity"], saved["scenes"], args.out)
        print(f"rewrote {os.path.join(args.out, 'RESULTS.md')}")
        return 0
    args.model = os.path.abspath(args.model)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    tmp = tempfile.mkdtemp(prefix="eval_swift_")
    binary = os.path.join(tmp, "dllava")
    shutil.copy2(args.dllava, binary)
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    built = datetime.datetime.fromtimestamp(os.path.getmtime(args.dllava), datetime.timezone.utc)

    picked = [(k, scenes.make_scene(scenes.scene_index(args.split, k)))
              for k in range(args.start, args.start + args.count)]
    records = []
    cap_rows = {m: [] for m in MODES}
    q_rows = {m: [] for m in MODES}
    q1_rows = {m: [] for m in MODES}
    qtype = {m: {} for m in MODES}
    img_keep = {m: [0, 0] for m in MODES}
    out_keep = {m: [0, 0] for m in MODES}
    on_shape = {m: [0, 0, 0] for m in MODES}  # kept patches on shapes, kept patches, shape patches
    shape_patches = 0
    for n, (k, scene) in enumerate(picked):
        png = os.path.join(tmp, f"{args.split}_{k:06d}.png")
        img = scenes.render(scene)
        img.save(png)
        qs = scenes.questions(scene)
        obj = object_patches(scene)
        shape_patches += len(obj)
        rec = {"index": scene["index"], "truth": scenes.caption(scene),
               "questions": [{"q": q, "a": a, "type": t} for q, a, t in qs], "modes": {}}
        learned_output_rate = 0.5
        for mode in MODES:  # dynamic runs before dynamic-random-output, which takes its rate
            extra = mode_args(mode, args, k, learned_output_rate)
            r = generate(binary, args, png, scenes.DESCRIBE, args.max_tokens, extra)
            st = r["stats"]
            cs = score.score_caption(r["text"], scene)
            cap_rows[mode].append(cs)
            img_keep[mode][0] += st["image_tokens_kept"]
            img_keep[mode][1] += st["image_tokens_total"]
            kept_out, gen = output_keep(st)
            if mode == "dynamic" and gen > 0:
                learned_output_rate = kept_out / gen
            out_keep[mode][0] += kept_out
            out_keep[mode][1] += gen
            kept_idx = r.get("kept_image_indices")
            if kept_idx is not None:
                on_shape[mode][0] += len(obj & set(kept_idx))
                on_shape[mode][1] += len(kept_idx)
                on_shape[mode][2] += len(obj)
            answers, correct = [], []
            for q, a, t in qs:
                ra = generate(binary, args, png, q, args.question_max_tokens, extra)
                ok = score.score_answer(ra["text"], a)
                answers.append(ra["text"])
                correct.append(int(ok))
                q_rows[mode].append(ok)
                qtype[mode].setdefault(t, []).append(ok)
            q1_rows[mode].append(correct[0])
            rec["modes"][mode] = {
                "caption": r["text"], "object_accuracy": cs["object_accuracy"], "exact": cs["exact"],
                "image_tokens_kept": st["image_tokens_kept"], "kv_cells_per_layer": st["kv_cells_per_layer"],
                "prompt_tokens": st["prompt_tokens"], "kept_image_indices": r.get("kept_image_indices"),
                "answers": answers, "correct": correct}
        records.append(rec)
        if (n + 1) % 10 == 0:
            print(f"{n + 1}/{len(picked)} scenes, {time.time() - t0:.0f} s", flush=True)
    swift_s = time.time() - t0

    summary = {}
    for mode in MODES:
        s = score.summarise(cap_rows[mode])
        s["question_accuracy"] = sum(q_rows[mode]) / len(q_rows[mode])
        s["first_question_accuracy"] = sum(q1_rows[mode]) / len(q1_rows[mode])
        s["questions"] = len(q_rows[mode])
        s["question_accuracy_by_type"] = {t: sum(v) / len(v) for t, v in sorted(qtype[mode].items())}
        s["question_count_by_type"] = {t: len(v) for t, v in sorted(qtype[mode].items())}
        s["image_keep_rate"] = img_keep[mode][0] / img_keep[mode][1]
        s["image_tokens_kept_mean"] = img_keep[mode][0] / len(picked)
        s["output_keep_rate_captions"] = out_keep[mode][0] / out_keep[mode][1] if out_keep[mode][1] else None
        s["output_tokens_kept"], s["output_tokens_generated"] = out_keep[mode]
        a, b, c = on_shape[mode]
        s["kept_on_shapes"] = a / b if b else None  # share of kept patches that show a shape
        s["shape_patches_kept"] = a / c if c else None  # share of shape patches kept
        summary[mode] = s
    # output keep rate of dynamic captions long enough for the gate's training (LEN_OT tokens)
    len_ot = json.load(open(os.path.join(args.model, "config.json")))["sparse_config"]["output_text_len_for_training"]
    long_k = long_n = 0
    for rec in records:
        d = rec["modes"]["dynamic"]
        st = {"kv_cells_per_layer": d["kv_cells_per_layer"], "prompt_tokens": d["prompt_tokens"],
              "image_tokens_total": GRID * GRID, "image_tokens_kept": d["image_tokens_kept"]}
        kk, gg = output_keep(st)
        if gg >= len_ot:
            long_k += kk
            long_n += gg
    summary["dynamic"]["output_keep_rate_captions_len_ot"] = long_k / long_n if long_n else None
    summary["shape_patch_share"] = shape_patches / (GRID * GRID * len(picked))

    parity = None
    if args.reference:
        t1 = time.time()
        ref = run_reference(args, picked)
        diff_cap = [rec["index"] for (k, _), rec in zip(picked, records)
                    if ref[k]["caption"] != rec["modes"]["full"]["caption"]]
        diff_ans = [rec["index"] for (k, _), rec in zip(picked, records)
                    if ref[k]["answer"] != rec["modes"]["full"]["answers"][0]]
        ref_rows = [score.score_caption(ref[k]["caption"], s) for k, s in picked]
        parity = {"scenes": len(picked), "caption_differs": diff_cap, "first_answer_differs": diff_ans,
                  "reference_object_accuracy": score.summarise(ref_rows)["object_accuracy"],
                  "reference_first_question_accuracy": sum(
                      score.score_answer(ref[k]["answer"], scenes.questions(s, k=1)[0][1]) for k, s in picked) / len(picked),
                  "examples": [{"index": rec["index"], "swift": rec["modes"]["full"]["caption"],
                                "reference": ref[k]["caption"]}
                               for (k, _), rec in zip(picked, records) if rec["index"] in diff_cap[:5]],
                  "seconds": time.time() - t1}
        for (k, _), rec in zip(picked, records):
            rec["reference"] = ref[k]

    picture_scenes = draw_pictures(records, args.pictures, args.out)
    command = "python Scripts/train/eval_swift.py " + " ".join(sys.argv[1:])
    meta = {"command": command.strip(), "split": args.split, "start": args.start, "scenes": len(picked),
            "keep": args.keep, "fastv_layer": args.fastv_layer, "seed": args.seed, "max_tokens": args.max_tokens,
            "question_max_tokens": args.question_max_tokens, "threads": args.threads, "picture_scenes": picture_scenes, "git_head": commit,
            "binary_mtime_utc": built.strftime("%Y-%m-%d %H:%M"), "swift_seconds": round(swift_s, 1),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        f.write('{"meta": ' + json.dumps(meta) + ',\n "summary": ' + json.dumps(summary) +
                ',\n "parity": ' + json.dumps(parity) + ',\n "scenes": [\n')
        f.write(",\n".join(json.dumps(r, separators=(",", ":")) for r in records))
        f.write("\n]}\n")
    write_markdown(meta, summary, parity, records, args.out)
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({m: {k: summary[m][k] for k in ("object_accuracy", "exact", "question_accuracy",
                                                       "image_keep_rate", "output_keep_rate_captions")}
                      for m in MODES}, indent=1))
    if parity:
        print("parity:", json.dumps({k: v for k, v in parity.items() if k != "examples"}))
    print(f"done in {time.time() - t0:.0f} s -> {args.out}")
    return 0


def write_markdown(meta, summary, parity, records, out_dir):
    keep, fastv_layer = meta["keep"], meta["fastv_layer"]
    names = {"full": "full context", "dynamic": "Dynamic-LLaVA (learned gates)",
             "fastv": f"FastV (K = {fastv_layer}, R = {keep})", "random": f"random image dropping ({keep})",
             "dynamic-random-output": "learned image gate, random output-token K/V",
             "dynamic-every-other": "learned image gate, every other output token's K/V"}
    f, dy, fv, rn = (summary[m] for m in IMAGE_MODES)
    ro, eo = summary["dynamic-random-output"], summary["dynamic-every-other"]
    pts = lambda x, y: f"{100 * (x - y):+.1f} points"  # noqa: E731
    L = []
    L.append("# dllava-scenes: evaluation with the Swift engine\n")
    L.append(f"The Swift engine on the scene model. {meta['scenes']} {meta['split']} scenes (indices "
             f"{scenes.SPLITS[meta['split']] + meta['start']}..{scenes.SPLITS[meta['split']] + meta['start'] + meta['scenes'] - 1}, "
             f"never used in training or tuning), every answer generated greedily by `dllava generate` "
             f"(release build of {meta['binary_mtime_utc']} UTC, repository at `{meta['git_head']}`, "
             f"`--threads {meta['threads']}`), scored by `Scripts/train/score.py`. Run {meta['date_utc']} UTC, "
             f"{meta['swift_seconds']:.0f} s of engine calls.\n")
    L.append("```\n" + meta["command"] + "\n```\n")
    L.append("## Against the issue's targets\n")
    L.append("| target | measured |")
    L.append("|---|---|")
    L.append(f"| full-context caption accuracy at least 90% | {pct(f['object_accuracy'])} |")
    L.append(f"| Dynamic-LLaVA within 2 points of full at 20% of the image tokens | {pct(dy['object_accuracy'])} at "
             f"{pct(dy['image_keep_rate'])} of the image tokens ({pts(dy['object_accuracy'], f['object_accuracy'])}) |")
    L.append(f"| random image dropping clearly worse | {pct(rn['object_accuracy'])} ({pts(rn['object_accuracy'], f['object_accuracy'])}); "
             f"FastV {pct(fv['object_accuracy'])} |")
    L.append(f"| learned output gate better than random and structured dropping at the same KV budget | learned "
             f"{pct(dy['object_accuracy'])} at {pct(dy['output_keep_rate_captions'])} kept; random "
             f"{pct(ro['object_accuracy'])} at {pct(ro['output_keep_rate_captions'])}; every other "
             f"{pct(eo['object_accuracy'])} at {pct(eo['output_keep_rate_captions'])} |")
    L.append("")
    L.append("## Accuracy\n")
    L.append("| mode | image tokens kept | output K/V kept | caption object acc. | exact caption | count | kind | colour | size | position | question acc. (all) | question acc. (first) |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for m in MODES:
        s = summary[m]
        o = s["output_keep_rate_captions"]
        L.append(f"| {names[m]} | {s['image_tokens_kept_mean']:.1f} / 144 ({pct(s['image_keep_rate'])}) | "
                 f"{pct(o) if o is not None else '-'} | "
                 f"**{pct(s['object_accuracy'])}** | {pct(s['exact'])} | {pct(s['count'])} | {pct(s['attr_kind'])} | "
                 f"{pct(s['attr_colour'])} | {pct(s['attr_size'])} | {pct(s['attr_position'])} | "
                 f"{pct(s['question_accuracy'])} | {pct(s['first_question_accuracy'])} |")
    nq = summary["full"]["questions"]
    L.append("")
    L.append(f"Caption object accuracy: matched objects / max(#truth, #parsed), an object counting only with kind, "
             f"colour, size and position all right; attribute columns pair objects by position. Questions: all "
             f"{nq} questions `scenes.questions()` gives for the {meta['scenes']} scenes (up to 9 per scene, "
             f"exact match after normalisation); \"first\" is the one question per scene that "
             f"`eval_reference.py` asks. Caption budget {meta['max_tokens']} tokens, answers {meta['question_max_tokens']}.\n")
    L.append("Question accuracy by type:\n")
    types = list(summary["full"]["question_accuracy_by_type"])
    L.append("| mode | " + " | ".join(f"{t} ({summary['full']['question_count_by_type'][t]})" for t in types) + " |")
    L.append("|---|" + "---|" * len(types))
    for m in MODES:
        L.append(f"| {m} | " + " | ".join(pct(summary[m]["question_accuracy_by_type"][t]) for t in types) + " |")
    L.append("")
    L.append("## Realised keep rates\n")
    L.append("| mode | image tokens kept / 144 | output-token K/V kept after the sparse layer (captions) |")
    L.append("|---|---|---|")
    for m in MODES:
        s = summary[m]
        o = s["output_keep_rate_captions"]
        L.append(f"| {m} | {pct(s['image_keep_rate'])} | {pct(o) if o is not None else '-'} "
                 f"({s['output_tokens_kept']} / {s['output_tokens_generated']}) |")
    L.append("")
    lo = dy["output_keep_rate_captions_len_ot"]
    L.append(f"Output side: from `stats.kv_cells_per_layer` of each caption call, "
             f"(cells in the last layer - prompt cells there) / (cells in the first layer - prompt tokens), "
             f"summed over the {meta['scenes']} captions (the final token's K/V is never written, so a caption of n "
             f"tokens contributes n - 1). The training target was 0.5 (`output_text_keep_rate`); on dynamic captions "
             f"of at least LEN_OT = 16 tokens the gate kept {pct(lo) if lo is not None else '-'}. "
             f"Full, FastV and random image dropping keep every output token by design.\n")
    L.append("Which image patches are kept (caption calls; a patch \"shows a shape\" when at least 10% of its "
             f"pixels are a shape's; {pct(summary['shape_patch_share'])} of all patches do):\n")
    L.append("| mode | kept patches that show a shape | shape patches kept |")
    L.append("|---|---|---|")
    for m in IMAGE_MODES[1:]:
        s = summary[m]
        if s["kept_on_shapes"] is not None:
            L.append(f"| {m} | {pct(s['kept_on_shapes'])} | {pct(s['shape_patches_kept'])} |")
    L.append("")
    L.append("## Output-token gate against random and every-other-token dropping\n")
    L.append("All three keep the same image tokens (the learned image gate) and differ only in which generated "
             "tokens' K/V enter the cache of the layers from the sparse layer on (`dllava generate --output-tokens`). "
             "The random rule keeps each token with the probability the learned gate realised on the same scene's "
             "caption, so both spend the same KV budget per scene; every-other keeps the 1st, 3rd, 5th, ... token.\n")
    L.append("| output-token rule | output K/V kept (captions) | caption object acc. | exact caption | kind | colour | size | position |")
    L.append("|---|---|---|---|---|---|---|---|")
    for m in OUTPUT_MODES:
        s = summary[m]
        L.append(f"| {names[m]} | {pct(s['output_keep_rate_captions'])} | **{pct(s['object_accuracy'])}** | {pct(s['exact'])} | "
                 f"{pct(s['attr_kind'])} | {pct(s['attr_colour'])} | {pct(s['attr_size'])} | {pct(s['attr_position'])} |")
    L.append("")
    L.append("## Kept image patches (dynamic mode, caption prompt)\n")
    L.append("Four test scenes (the first with 1, 2, 3 and 4 shapes). Kept patches outlined and shown as they are; dropped patches blurred and dimmed (12 x 12 grid of "
             "28-px patches; the image predictor's choice at the sparse layer; 32-colour PNGs).\n")
    for rec in [r for r in records if r["index"] in meta["picture_scenes"]]:
        dm = rec["modes"]["dynamic"]
        if dm["kept_image_indices"] is None:
            continue
        L.append(f"![kept patches, scene {rec['index']}](kept_{rec['index']}.png)  ")
        L.append(f"scene {rec['index']}: {len(dm['kept_image_indices'])} kept. Truth: {rec['truth']}  ")
        L.append(f"dynamic: {dm['caption']}  ")
        L.append(f"full: {rec['modes']['full']['caption']}\n")
    L.append("## Parity with the PyTorch reference (full context)\n")
    if parity is None:
        L.append("Not run (pass `--reference`).\n")
    else:
        L.append(f"`eval_reference.py`'s model (plain transformers classes loading the same exported files, "
                 f"float32 compute, greedy) on the same {parity['scenes']} scenes: captions differ on "
                 f"**{len(parity['caption_differs'])}** scenes, first answers on **{len(parity['first_answer_differs'])}**. "
                 f"Reference caption object accuracy {pct(parity['reference_object_accuracy'])}, "
                 f"first-question accuracy {pct(parity['reference_first_question_accuracy'])} "
                 f"(Swift full: {pct(summary['full']['object_accuracy'])}, {pct(summary['full']['first_question_accuracy'])}).\n")
        for e in parity["examples"]:
            L.append(f"- scene {e['index']}: Swift `{e['swift']}` / reference `{e['reference']}`")
        if parity["examples"]:
            L.append("")
    L.append("## Observations\n")
    L.append(f"- Caption object accuracy against full context: dynamic {pts(dy['object_accuracy'], f['object_accuracy'])}, "
             f"FastV {pts(fv['object_accuracy'], f['object_accuracy'])}, random {pts(rn['object_accuracy'], f['object_accuracy'])}, "
             f"all at about {pct(keep)} of the image tokens. Questions (all): dynamic "
             f"{pts(dy['question_accuracy'], f['question_accuracy'])}, FastV {pts(fv['question_accuracy'], f['question_accuracy'])}, "
             f"random {pts(rn['question_accuracy'], f['question_accuracy'])}.")
    L.append(f"- Output side, same image tokens and the same KV budget: learned gate {pct(dy['object_accuracy'])}, random "
             f"{pct(ro['object_accuracy'])} ({pts(ro['object_accuracy'], dy['object_accuracy'])}), every other "
             f"{pct(eo['object_accuracy'])} ({pts(eo['object_accuracy'], dy['object_accuracy'])}).")
    if dy["shape_patches_kept"] is not None:
        L.append(f"- The image gate keeps {pct(dy['shape_patches_kept'])} of the patches that show a shape (FastV "
                 f"{pct(fv['shape_patches_kept'])}, random {pct(rn['shape_patches_kept'])}); the rest of its budget goes "
                 f"to background patches (pictures above).")
    if dy["output_keep_rate_captions"] is not None:
        L.append(f"- The output gate realises {pct(dy['output_keep_rate_captions'])} over all dynamic captions "
                 f"({pct(lo)} on captions of at least LEN_OT tokens; target 50%). "
                 f"The engine gates every generated token, while training applied the gate only to answers of at least "
                 f"LEN_OT tokens.")
    L.append("")
    L.append("## Notes\n")
    L.append(f"- FastV prunes after layer K = {fastv_layer} of the model's 4 (0-based layers 0..{fastv_layer - 1} see "
             f"every image token, ranked by layer {fastv_layer - 1}'s attention from the last prompt token; the paper's "
             f"K = 2 of 32 layers would be almost at the input here; K = 2 matches the checkpoint's `sparse_layer` 2, "
             f"so FastV, random and the learned gate all prune at the same depth).")
    L.append(f"- Random image dropping and the random output rule use `--seed {meta['seed']} + scene position`, the same "
             f"seed for the caption and all questions of a scene.")
    L.append("- `results.json` holds the summary and, per scene and mode, the caption, the answers, their "
             "correctness, the kept image indices and the KV cell counts.")
    with open(os.path.join(out_dir, "RESULTS.md"), "w") as fh:
        fh.write("\n".join(L) + "\n")


if __name__ == "__main__":
    sys.exit(main())
