#!/usr/bin/env python3
"""Trains the scene Dynamic-LLaVA on the CPU, in two stages, with checkpoints and resume.

Stage 1 (plain LLaVA-1.5, from scratch): vision tower, projector and LLaMA trained together on
captions and questions (vicuna_v1 prompt, loss on answer tokens only). AdamW, linear warmup then
cosine decay to 10% of the peak.

Stage 2 (Dynamic-LLaVA, DYNAMIC_LLAVA.md section 7), initialised from stage 1's final weights:
image predictor and output-text predictor at layer l = sparse_layer; hard Gumbel-Softmax with
straight-through gradients, tau = 1.0 x (0.1/1.0)^progress; MaskedSoftmax in layers >= l;
loss = CE + mask_loss_weight x [mean_b (0.2 - image keep_b)^2 + mean_b (0.5 - output keep_b)^2],
the output term only for last answers of at least output_text_len_for_training tokens (shorter
answers keep everything). Predictor lr 2e-4, projector + LLM lr small (--llm-lr), vision tower
frozen (as in LLaVA fine-tuning).

Schedules run on `progress` in [0, 1]: step / --steps when --steps is given, otherwise training
seconds / (--minutes x 60), so a run always completes its schedule inside its time budget
whatever the machine's speed (the step count then depends on the speed; the data stream and the
Gumbel noise do not: batch k is a pure function of (seed, k), and RNG states are checkpointed).

Run directory: log.txt (human), metrics.jsonl, args.json, ckpt.pt (every --ckpt-minutes, and on
SIGTERM/SIGINT), final.pt (weights + sizes, what export.py reads), val.json (final validation).
--resume continues from ckpt.pt; a finished stage (final.pt present) is skipped.

Usage:
  python train.py --stage 1 --run-dir runs/full/stage1 --preset full --minutes 60 --resume
  python train.py --stage 2 --run-dir runs/full/stage2 --init runs/full/stage1/final.pt --minutes 25 --resume
"""

import argparse
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict

import torch

import data
import score
import scenes
from model import PRESETS, ModelSize, PatchProbe, SceneLlava, SparseConfig, count_parameters, generate

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", type=int, choices=[1, 2], required=True)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--preset", default="full", choices=list(PRESETS))
    ap.add_argument("--tokenizer", default=os.path.join(HERE, "tokenizer", "tokenizer.model"))
    ap.add_argument("--init", help="stage 2: stage 1's final.pt")
    ap.add_argument("--minutes", type=float, default=60.0, help="training-time budget of this stage")
    ap.add_argument("--steps", type=int, default=0, help="fixed step count instead of the time budget")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3, help="stage 1 peak lr")
    ap.add_argument("--llm-lr", type=float, default=1e-4, help="stage 2 projector + LLM lr (1/10 of stage 1 peak)")
    ap.add_argument("--predictor-lr", type=float, default=2e-4, help="stage 2 predictor lr")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--probe-weight", type=float, default=1.0,
                    help="stage 1: weight of the dense vision probe's loss (model.PatchProbe); 0 = no probe")
    ap.add_argument("--warmup", type=float, default=0.03, help="warmup fraction of the schedule")
    ap.add_argument("--tau-start", type=float, default=1.0)
    ap.add_argument("--tau-end", type=float, default=0.1)
    ap.add_argument("--len-ot", type=int, default=16, help="output_text_len_for_training")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--train-scenes", type=int, default=scenes.SPLIT_SIZE,
                    help="draw training scenes from the first N of the train split")
    ap.add_argument("--ckpt-minutes", type=float, default=4.0)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--val-every-minutes", type=float, default=10.0)
    ap.add_argument("--val-batches", type=int, default=4, help="fixed val batches for the val loss")
    ap.add_argument("--eval-scenes", type=int, default=48, help="val scenes for the final generation check")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu (the plan) or cuda (same schedule, for pilots)")
    ap.add_argument("--workers", type=int, default=0, help="data-loader processes rendering batches")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--time-steps", type=int, default=0,
                    help="only time this many steps (after 2 warm-up steps), print and exit")
    return ap.parse_args(argv)


class Logger:
    def __init__(self, run_dir):
        self.text = open(os.path.join(run_dir, "log.txt"), "a", buffering=1)
        self.jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)

    def __call__(self, msg, **metrics):
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        self.text.write(line + "\n")
        if metrics:
            self.jsonl.write(json.dumps(metrics) + "\n")


def lr_factor(progress, warmup):
    if progress < warmup:
        return max(progress / warmup, 0.02)
    q = min((progress - warmup) / max(1e-9, 1 - warmup), 1.0)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * q))


def atomic_save(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def build(args, tok):
    if args.stage == 1:
        size = PRESETS[args.preset]
        sparse = SparseConfig(d_model=size.d_model, nhead=size.nhead, dim_feedforward=size.dim_feedforward,
                              num_layers=size.predictor_layers, output_text_len_for_training=args.len_ot)
        torch.manual_seed(args.seed)
        model = SceneLlava(size, tok.vocab_size, sparse)
    else:
        if not args.init:
            sys.exit("stage 2 needs --init <stage 1 final.pt>")
        init = torch.load(args.init, map_location="cpu", weights_only=False)
        size = ModelSize(**init["size"])
        sparse = SparseConfig(**init["sparse"])
        sparse.output_text_len_for_training = args.len_ot
        torch.manual_seed(args.seed + 1)
        model = SceneLlava(size, init["vocab_size"], sparse)
        model.load_state_dict(init["model"])
    return model, size, sparse


def make_probe(args, size):
    """Stage 1's dense vision probe (None in stage 2, or with --probe-weight 0)."""
    if args.stage != 1 or args.probe_weight <= 0:
        return None
    torch.manual_seed(args.seed + 2)
    return PatchProbe(size.vision_hidden, [len(scenes.KINDS) + 1, len(scenes.COLOURS) + 1, len(scenes.SIZES) + 1])


def make_optimizer(args, model, probe):
    if args.stage == 1:
        params = model.base_parameters() + model.predictor_parameters()
        if probe is not None:
            params += list(probe.parameters())
        groups = [{"params": params, "lr": args.lr, "base_lr": args.lr}]
    else:
        for p in model.vision.parameters():
            p.requires_grad_(False)
        groups = [
            {"params": model.predictor_parameters(), "lr": args.predictor_lr, "base_lr": args.predictor_lr},
            {"params": model.base_parameters(include_vision=False), "lr": args.llm_lr, "base_lr": args.llm_lr},
        ]
    return torch.optim.AdamW(groups, betas=(0.9, 0.98), weight_decay=args.weight_decay)


@torch.no_grad()
def val_loss(model, tok, args, dynamic, tau):
    model.eval()
    tot = {}
    for k in range(args.val_batches):
        # val batches: a fixed stream from the validation split (seed 0, steps 0..)
        import random
        rng = random.Random(99_000 + k)
        items = []
        for _ in range(8):
            scene = scenes.make_scene(scenes.scene_index("val", rng.randrange(10_000)))
            items.append((data.pixels(scenes.render(scene)), data.build_suffix(tok, scenes.conversation(scene, rng))))
        out = model(data.collate(tok, items).to(args.device), dynamic=dynamic, tau=tau)
        for key, v in out.items():
            tot[key] = tot.get(key, 0.0) + float(v) / args.val_batches
    model.train()
    return tot


@torch.no_grad()
def val_generation(model, tok, split, count, modes, start=0, chunk=16, device="cpu"):
    """Captions and one question per scene on `count` scenes of `split`; -> {mode: summary}."""
    items = data.eval_items(split, count, start)
    results = {}
    for mode in modes:
        cap_rows, qa_rows, keep = [], [], []
        for c0 in range(0, len(items), chunk):
            part = items[c0:c0 + chunk]
            px = torch.stack([data.pixels(scenes.render(s)) for s, _, _, _ in part]).to(device)
            prefix = torch.tensor(tok.prefix, device=device)
            caps, st1 = generate(model, prefix, px, [tok.prompt(scenes.DESCRIBE)[1] for _ in part], tok.eos,
                                 max_new=72, mode=mode, seed=c0)
            ans, st2 = generate(model, prefix, px, [tok.prompt(q)[1] for _, q, _, _ in part], tok.eos,
                                max_new=8, mode=mode, seed=c0 + 1)
            for (s, q, a, t), c, g in zip(part, caps, ans):
                cap_rows.append(score.score_caption(tok.decode(c), s))
                qa_rows.append({"question_accuracy": score.score_answer(tok.decode(g), a)})
            keep.append((st1["image_keep"], st1["output_keep"]))
        summary = {**score.summarise(cap_rows), **score.summarise(qa_rows)}
        summary["image_keep"] = sum(k[0] for k in keep) / len(keep)
        summary["output_keep"] = sum(k[1] for k in keep) / len(keep)
        results[mode] = summary
    # one example for the log
    s, _, _, _ = items[0]
    px = data.pixels(scenes.render(s))[None].to(device)
    c, _ = generate(model, torch.tensor(tok.prefix, device=device), px, [tok.prompt(scenes.DESCRIBE)[1]], tok.eos, max_new=72)
    results["example"] = {"truth": scenes.caption(s), "generated": tok.decode(c[0])}
    model.train()
    return results


class StepBatches(torch.utils.data.IterableDataset):
    """Training batches from `start` on (batch k = data.training_batch(seed, k)); with several
    workers, worker w renders steps start + w, start + w + W, ... and the loader interleaves them
    back in step order."""

    def __init__(self, tok, args, start, patch_size):
        self.tok, self.args, self.start, self.patch_size = tok, args, start, patch_size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, nw = (info.id, info.num_workers) if info else (0, 1)
        k = self.start + w
        while True:
            yield data.training_batch(self.tok, self.args.seed, k, self.args.batch, self.args.train_scenes, self.patch_size)
            k += nw


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # denormals make CPU kernels many times slower
    torch.backends.cudnn.allow_tf32 = False  # a cuda pilot computes in fp32 like the CPU run
    torch.backends.cuda.matmul.allow_tf32 = False
    os.makedirs(args.run_dir, exist_ok=True)
    final_path = os.path.join(args.run_dir, "final.pt")
    ckpt_path = os.path.join(args.run_dir, "ckpt.pt")
    if args.resume and os.path.exists(final_path) and not args.time_steps:
        print(f"stage {args.stage} already finished: {final_path}")
        return
    log = Logger(args.run_dir)
    tok = data.SceneTokenizer(args.tokenizer)
    model, size, sparse = build(args, tok)
    model.to(args.device)
    probe = make_probe(args, size)
    if probe is not None:
        probe.to(args.device)
    opt = make_optimizer(args, model, probe)
    dynamic = args.stage == 2
    step, train_seconds = 0, 0.0
    if args.resume and os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(ck["model"])
        if probe is not None:
            probe.load_state_dict(ck["probe"])
        opt.load_state_dict(ck["optimizer"])
        step, train_seconds = ck["step"], ck["train_seconds"]
        torch.set_rng_state(ck["torch_rng"])
        log(f"resumed from {ckpt_path} at step {step}, {train_seconds / 60:.1f} min trained")
    else:
        with open(os.path.join(args.run_dir, "args.json"), "w") as f:
            json.dump({"args": vars(args), "size": asdict(size), "sparse": asdict(sparse)}, f, indent=1)
        log(f"stage {args.stage} preset {args.preset if args.stage == 1 else args.init}: vision {count_parameters(model.vision) / 1e6:.2f}M, "
            f"projector {count_parameters(model.projector) / 1e6:.2f}M, llm {count_parameters(model.llm) / 1e6:.2f}M, "
            f"predictors {sum(p.numel() for p in model.predictor_parameters()) / 1e6:.2f}M; "
            f"{size.image_tokens} image tokens; prefix {len(tok.prefix)} tokens; vocab {tok.vocab_size}")

    budget = args.minutes * 60.0

    def progress():
        return step / args.steps if args.steps else train_seconds / budget

    def save_ckpt(reason):
        atomic_save({"model": model.state_dict(), "probe": probe.state_dict() if probe is not None else None,
                     "optimizer": opt.state_dict(), "step": step,
                     "train_seconds": train_seconds, "torch_rng": torch.get_rng_state()}, ckpt_path)
        log(f"checkpoint ({reason}) at step {step}, {train_seconds / 60:.1f} min")

    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    model.train()
    batches = iter(torch.utils.data.DataLoader(
        StepBatches(tok, args, step, size.patch_size if probe is not None else None), batch_size=None, num_workers=args.workers,
        prefetch_factor=4 if args.workers else None, persistent_workers=False))
    last_ckpt = last_val = time.time()
    acc = {}
    timings = []
    while progress() < 1.0:
        if stop["signal"] is not None:
            save_ckpt(f"signal {stop['signal']}")
            log("stopped; rerun with --resume to continue")
            sys.exit(1)
        t0 = time.time()
        pr = progress()
        tau = args.tau_start * (args.tau_end / args.tau_start) ** pr
        f = lr_factor(pr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * f
        batch = next(batches).to(args.device)
        t1 = time.time()
        out = model(batch, dynamic=dynamic, tau=tau, probe=probe, probe_weight=args.probe_weight)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        gn = torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        dt = time.time() - t0
        step += 1
        train_seconds += dt
        if args.time_steps:
            timings.append((dt, time.time() - t1))
            if len(timings) >= args.time_steps + 2:
                ts = [x[0] for x in timings[2:]]
                cs = [x[1] for x in timings[2:]]
                print(json.dumps({"preset": args.preset, "stage": args.stage, "batch": args.batch,
                                  "steps_timed": len(ts), "step_s": sum(ts) / len(ts),
                                  "compute_s": sum(cs) / len(cs), "data_s": (sum(ts) - sum(cs)) / len(ts),
                                  "seq_len": batch.suffix.shape[1] + len(tok.prefix) + size.image_tokens,
                                  "each_s": [round(x, 2) for x in ts]}))
                return
            continue
        for k, v in out.items():
            v = float(v.detach() if torch.is_tensor(v) else v)
            if not math.isnan(v):  # output_keep is NaN for a batch without a long answer
                acc[k] = acc.get(k, 0.0) + v
                acc["n_" + k] = acc.get("n_" + k, 0) + 1
        acc["grad_norm"] = acc.get("grad_norm", 0.0) + float(gn)
        acc["step_s"] = acc.get("step_s", 0.0) + dt
        acc["n"] = acc.get("n", 0) + 1
        if step % args.log_every == 0:
            m = {k: v / acc.get("n_" + k, acc["n"]) for k, v in acc.items() if k != "n" and not k.startswith("n_")}
            log(f"step {step} prog {pr:.3f} loss {m['loss']:.4f} ce {m['ce']:.4f} "
                + (f"img_keep {m['image_keep']:.3f} out_keep {m.get('output_keep', float('nan')):.3f} tau {tau:.3f} "
                   if dynamic else "")
                + (f"probe {m['probe_loss']:.4f} probe_kind_acc {m['probe_kind_accuracy']:.3f} " if probe is not None else "")
                + f"lr {opt.param_groups[0]['lr']:.2e} gn {m['grad_norm']:.2f} {m['step_s']:.2f}s/step",
                kind="train", step=step, progress=pr, tau=tau, lr=opt.param_groups[0]["lr"], **m)
            acc = {}
        now = time.time()
        if now - last_ckpt >= args.ckpt_minutes * 60:
            save_ckpt("periodic")
            last_ckpt = time.time()
        if now - last_val >= args.val_every_minutes * 60:
            v = val_loss(model, tok, args, dynamic, tau)
            log("val " + " ".join(f"{k} {x:.4f}" for k, x in v.items()), kind="val", step=step, **v)
            last_val = time.time()
    save_ckpt("end of schedule")
    atomic_save({"model": model.state_dict(), "size": asdict(size), "sparse": asdict(sparse),
                 "vocab_size": tok.vocab_size, "stage": args.stage, "steps": step,
                 "train_seconds": train_seconds, "args": vars(args)}, final_path)
    log(f"stage {args.stage} finished: {step} steps, {train_seconds / 60:.1f} min; wrote {final_path}")
    v = val_loss(model, tok, args, dynamic, args.tau_end)
    log("val " + " ".join(f"{k} {x:.4f}" for k, x in v.items()), kind="val", step=step, **v)
    if args.eval_scenes:
        modes = ["full", "dynamic", "random"] if dynamic else ["full"]
        res = val_generation(model, tok, "val", args.eval_scenes, modes, device=args.device)
        with open(os.path.join(args.run_dir, "val.json"), "w") as f:
            json.dump(res, f, indent=1)
        for mode in modes:
            r = res[mode]
            log(f"val generation [{mode}] caption object acc {r['object_accuracy']:.3f} exact {r['exact']:.3f} "
                f"question acc {r['question_accuracy']:.3f} image keep {r['image_keep']:.2f} "
                f"output keep {r['output_keep']:.2f}", kind="val_generation", mode=mode, **r)
        log(f"example: truth     {res['example']['truth']}")
        log(f"example: generated {res['example']['generated']}")


if __name__ == "__main__":
    main()
