#!/usr/bin/env python3
"""Seeded synthetic scenes (coloured shapes on textured backgrounds) and their tasks.

A scene is fully determined by its index: `make_scene(i)` always returns the same objects, and
`render(scene)` always returns the same 336x336 RGB image (Python `random` and numpy PCG64,
both seeded from the index; no global state). Splits are index ranges, so no file needs to be
stored: the training loop renders scenes on the fly.

    split  indices                      use
    train  [0, 1_000_000)               training (both stages)
    val    [1_000_000, 1_000_000 + 1e6) validation during training (loss, quick accuracy)
    test   [2_000_000, 2_000_000 + 1e6) final evaluation only; never trained or tuned on

Objects: 1-4 shapes, each in a distinct cell of a 3x3 grid, jittered inside the cell so that large
shapes may overlap their neighbours. Attributes: kind (circle, square, triangle, star), colour
(red, green, blue, yellow, purple, orange; each jittered), size (small, large), cell.
Background: one of plain, stripes, checker, gradient, blotches, in low-saturation tones, plus
Gaussian pixel noise.

Tasks (answers end with the EOS token in training; score.py parses them back):
  caption   "Describe the image." ->
            "There are two shapes: a large red circle at the top left, a small blue star at the
             centre."   objects in reading order (row, then column); "There is one shape: ..." for one.
  questions short questions with one-word or two-word answers ("Two", "Red", "Yes", "Top left").

Usage:  python scenes.py --split test --count 8 --out /tmp/scenes   (writes PNG + JSON to look at)
"""

import argparse
import json
import os
import random

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 336
SPLITS = {"train": 0, "val": 1_000_000, "test": 2_000_000}
SPLIT_SIZE = 1_000_000

KINDS = ["circle", "square", "triangle", "star"]
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 55, 175),
    "orange": (245, 135, 30),
}
COLOUR_NAMES = list(COLOURS)
SIZES = {"small": (26, 32), "large": (40, 50)}  # radius range in pixels (circumscribed)
SIZE_NAMES = list(SIZES)
# Cell (row, col) -> phrase. Used in captions ("at the top left") and answers ("Top left").
POSITIONS = [["top left", "top", "top right"],
             ["left", "centre", "right"],
             ["bottom left", "bottom", "bottom right"]]
POSITION_NAMES = [p for row in POSITIONS for p in row]
NUMBERS = ["zero", "one", "two", "three", "four"]
MAX_OBJECTS = 4

DESCRIBE = "Describe the image."
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")


def scene_index(split, k):
    """Global index of the k-th scene of a split."""
    if not 0 <= k < SPLIT_SIZE:
        raise ValueError(f"scene {k} outside split {split}")
    return SPLITS[split] + k


def split_of(index):
    for name, start in SPLITS.items():
        if start <= index < start + SPLIT_SIZE:
            return name
    raise ValueError(f"index {index} is in no split")


# ------------------------------------------------------------------------------------------------
# Scene structure

def make_scene(index):
    """The objects of scene `index`: a dict with `index`, `objects` (reading order) and the
    rendering parameters (background, noise), all drawn from `random.Random(index)`."""
    rng = random.Random(index)
    n = rng.randint(1, MAX_OBJECTS)
    cells = rng.sample(range(9), n)
    objects = []
    for cell in sorted(cells):
        r, c = divmod(cell, 3)
        size = rng.choice(SIZE_NAMES)
        lo, hi = SIZES[size]
        objects.append({
            "kind": rng.choice(KINDS),
            "colour": rng.choice(COLOUR_NAMES),
            "size": size,
            "row": r, "col": c,
            "position": POSITIONS[r][c],
            "radius": rng.uniform(lo, hi),
            # jitter of the centre inside its 112-px cell; large shapes may cross into neighbours
            "dx": rng.uniform(-22, 22), "dy": rng.uniform(-22, 22),
            "rgb_jitter": [rng.randint(-18, 18) for _ in range(3)],
            "angle": rng.uniform(-0.25, 0.25),  # radians, small tilt of polygons
        })
    background = {
        "style": rng.choice(["plain", "stripes", "checker", "gradient", "blotches"]),
        "base": [rng.randint(95, 175) for _ in range(3)],
        "contrast": rng.randint(10, 35),
        "period": rng.randint(10, 40),
        "vertical": rng.random() < 0.5,
        "noise_sigma": rng.uniform(3.0, 12.0),
    }
    # keep the background low-saturation so that no background is mistaken for a shape colour
    mean = sum(background["base"]) / 3
    background["base"] = [int(mean + 0.35 * (v - mean)) for v in background["base"]]
    return {"index": index, "objects": objects, "background": background}


def mirror(scene):
    """The scene whose picture is render(scene) flipped left to right (up to rasterisation): every
    object moves to the mirrored column with mirrored jitter and tilt, objects in reading order
    again. Training uses it to get two samples from one (costly) rendering."""
    objects = []
    for o in scene["objects"]:
        m = dict(o, col=2 - o["col"], dx=-o["dx"], angle=-o["angle"])
        m["position"] = POSITIONS[m["row"]][m["col"]]
        objects.append(m)
    objects.sort(key=lambda o: (o["row"], o["col"]))
    return {**scene, "objects": objects, "mirrored": not scene.get("mirrored", False)}


# ------------------------------------------------------------------------------------------------
# Rendering

def _background(bg, rng):
    s = IMAGE_SIZE
    base = np.array(bg["base"], dtype=np.float32)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    t = xx if bg["vertical"] else yy
    k = bg["contrast"]
    style = bg["style"]
    if style == "plain":
        shade = np.zeros((s, s), np.float32)
    elif style == "stripes":
        shade = k * np.sign(np.sin(2 * np.pi * t / bg["period"]))
    elif style == "checker":
        p = bg["period"]
        shade = k * (((xx // p) + (yy // p)) % 2 * 2 - 1)
    elif style == "gradient":
        shade = k * (t / s * 2 - 1) * 1.5
    else:  # blotches: a few soft Gaussian blobs
        shade = np.zeros((s, s), np.float32)
        for _ in range(6):
            cx, cy = rng.uniform(0, s, size=2)
            w = rng.uniform(30, 90)
            shade += rng.uniform(-1, 1) * k * 1.5 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * w * w))
    img = base[None, None, :] + shade[:, :, None]
    return img


def _polygon(kind, cx, cy, r, angle):
    if kind == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        scale = r / np.sqrt(2)
    elif kind == "triangle":
        pts = [(0, -1), (np.cos(np.pi / 6), 0.5), (-np.cos(np.pi / 6), 0.5)]
        scale = r
    elif kind == "star":
        pts = []
        for j in range(10):
            a = -np.pi / 2 + j * np.pi / 5
            rad = 1.0 if j % 2 == 0 else 0.45
            pts.append((rad * np.cos(a), rad * np.sin(a)))
        scale = r
    else:
        raise ValueError(kind)
    ca, sa = np.cos(angle), np.sin(angle)
    return [(cx + scale * (x * ca - y * sa), cy + scale * (x * sa + y * ca)) for x, y in pts]


def _draw_objects(draw, scene, fill):
    """Draws the scene's objects in reading order (later ones on top); `fill(k, o)` is the fill of
    object k. The one geometry behind the picture (render) and the labels (object_mask)."""
    cell = IMAGE_SIZE / 3
    for k, o in enumerate(scene["objects"]):
        cx = (o["col"] + 0.5) * cell + o["dx"]
        cy = (o["row"] + 0.5) * cell + o["dy"]
        r = o["radius"]
        if o["kind"] == "circle":
            draw.ellipse([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=fill(k, o))
        else:
            draw.polygon(_polygon(o["kind"], cx, cy, r, o["angle"]), fill=fill(k, o))


def render(scene):
    """336x336 RGB PIL image of the scene (deterministic)."""
    rng = np.random.default_rng(scene["index"])
    bg = scene["background"]
    img = np.clip(_background(bg, rng), 0, 255).astype(np.uint8)
    pil = Image.fromarray(img, "RGB")
    _draw_objects(ImageDraw.Draw(pil), scene,
                  lambda k, o: tuple(int(np.clip(v + j, 0, 255)) for v, j in zip(COLOURS[o["colour"]], o["rgb_jitter"])))
    arr = np.asarray(pil).astype(np.float32)
    arr += rng.normal(0.0, bg["noise_sigma"], size=arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGB")


def object_mask(scene):
    """[336, 336] uint8: 0 background, k + 1 where object k is visible (render()'s geometry)."""
    m = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    _draw_objects(ImageDraw.Draw(m), scene, lambda k, o: k + 1)
    return np.asarray(m)


def patch_labels(scene, patch_size, min_fraction=0.1):
    """Per patch (row-major over the ViT's grid) the object that covers most of it, if it covers
    at least `min_fraction`: int64 [3, N] of (kind, colour, size) class ids, 0 = background and
    attribute + 1 otherwise. Dense targets for the vision tower's pretraining probe."""
    g = IMAGE_SIZE // patch_size
    mask = object_mask(scene)[:g * patch_size, :g * patch_size]
    patches = mask.reshape(g, patch_size, g, patch_size).transpose(0, 2, 1, 3).reshape(g * g, -1)
    n_obj = len(scene["objects"])
    cover = np.stack([(patches == k + 1).mean(axis=1) for k in range(n_obj)], axis=1)  # [N, objects]
    best = cover.argmax(axis=1)
    on = cover[np.arange(g * g), best] >= min_fraction
    labels = np.zeros((3, g * g), dtype=np.int64)
    for k, o in enumerate(scene["objects"]):
        sel = on & (best == k)
        labels[0, sel] = KINDS.index(o["kind"]) + 1
        labels[1, sel] = COLOUR_NAMES.index(o["colour"]) + 1
        labels[2, sel] = SIZE_NAMES.index(o["size"]) + 1
    return labels


# ------------------------------------------------------------------------------------------------
# Tasks

def _article(word):
    return "an" if word[0] in "aeiou" else "a"


def object_phrase(o):
    return f"{_article(o['size'])} {o['size']} {o['colour']} {o['kind']} at the {o['position']}"


def caption(scene):
    objs = scene["objects"]
    n = len(objs)
    head = "There is one shape: " if n == 1 else f"There are {NUMBERS[n]} shapes: "
    return head + ", ".join(object_phrase(o) for o in objs) + "."


def _count_answer(k):
    return NUMBERS[k].capitalize()


def _candidate_questions(scene, rng):
    """All (question, answer, type) pairs that can be asked about the scene, in a fixed order,
    with yes/no questions balanced by construction."""
    objs = scene["objects"]
    out = [("How many shapes are there?", _count_answer(len(objs)), "count")]
    colour = rng.choice([o["colour"] for o in objs] + [rng.choice(COLOUR_NAMES)])
    out.append((f"How many {colour} shapes are there?",
                _count_answer(sum(o["colour"] == colour for o in objs)), "count_colour"))
    kind = rng.choice([o["kind"] for o in objs] + [rng.choice(KINDS)])
    out.append((f"How many {kind}s are there?", _count_answer(sum(o["kind"] == kind for o in objs)), "count_kind"))
    kinds = [o["kind"] for o in objs]
    unique = [o for o in objs if kinds.count(o["kind"]) == 1]
    if unique:
        o = rng.choice(unique)
        out.append((f"What colour is the {o['kind']}?", o["colour"].capitalize(), "colour"))
    o = rng.choice(objs)
    out.append((f"What shape is at the {o['position']}?", o["kind"].capitalize(), "shape"))
    side, test = rng.choice([("on the left", lambda x: x["col"] == 0), ("on the right", lambda x: x["col"] == 2),
                             ("at the top", lambda x: x["row"] == 0), ("at the bottom", lambda x: x["row"] == 2)])
    want_yes = rng.random() < 0.5
    pool = [x["kind"] for x in objs if test(x)] if want_yes else [k for k in KINDS if not any(
        x["kind"] == k and test(x) for x in objs)]
    if pool:
        k = rng.choice(pool)
        yes = any(x["kind"] == k and test(x) for x in objs)
        out.append((f"Is there {_article(k)} {k} {side}?", "Yes" if yes else "No", "where_yesno"))
    want_yes = rng.random() < 0.5
    if want_yes:
        o = rng.choice(objs)
        c, k = o["colour"], o["kind"]
    else:
        absent = [(c, k) for c in COLOUR_NAMES for k in KINDS
                  if not any(x["colour"] == c and x["kind"] == k for x in objs)]
        c, k = rng.choice(absent)
    yes = any(x["colour"] == c and x["kind"] == k for x in objs)
    out.append((f"Is there {_article(c)} {c} {k}?", "Yes" if yes else "No", "exists"))
    pairs = [(x["colour"], x["kind"]) for x in objs]
    unique = [x for x in objs if pairs.count((x["colour"], x["kind"])) == 1]
    if unique:
        o = rng.choice(unique)
        out.append((f"Where is the {o['colour']} {o['kind']}?", o["position"].capitalize(), "where"))
        o = rng.choice(unique)
        out.append((f"What size is the {o['colour']} {o['kind']}?", o["size"].capitalize(), "size"))
    return out


def questions(scene, k=None, salt=0):
    """Up to `k` distinct (question, answer, type) triples for the scene, drawn deterministically
    from (index, salt); all of them when k is None."""
    rng = random.Random(scene["index"] * 7919 + 17 + salt)
    cand = _candidate_questions(scene, rng)
    rng.shuffle(cand)
    return cand if k is None else cand[:k]


def conversation(scene, rng):
    """A training conversation for the scene: either the caption alone (single turn, exactly the
    evaluation prompt) or 2-3 questions (multi-turn, the image is shown once). Returns a list of
    (question, answer) turns."""
    if rng.random() < 0.5:
        return [(DESCRIBE, caption(scene))]
    qs = questions(scene, k=rng.randint(2, 3), salt=rng.randrange(1 << 30))
    return [(q, a) for q, a, _ in qs]


def domain_text():
    """Every phrase the model can see or say, for tokenizer training (besides sampled scenes)."""
    lines = [SYSTEM, "USER:", "ASSISTANT:", DESCRIBE]
    for n in NUMBERS:
        lines.append(n.capitalize())
    for k in KINDS:
        for c in COLOUR_NAMES:
            for s in SIZE_NAMES:
                for p in POSITION_NAMES:
                    lines.append(f"{_article(s)} {s} {c} {k} at the {p}")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="test", choices=list(SPLITS))
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--count", type=int, default=8)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    meta = []
    for k in range(args.start, args.start + args.count):
        scene = make_scene(scene_index(args.split, k))
        name = f"{args.split}_{k:06d}.png"
        render(scene).save(os.path.join(args.out, name))
        meta.append({"image": name, "scene": scene, "caption": caption(scene),
                     "questions": [{"question": q, "answer": a, "type": t} for q, a, t in questions(scene)]})
    with open(os.path.join(args.out, "scenes.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"wrote {len(meta)} scenes to {args.out}")


if __name__ == "__main__":
    main()
