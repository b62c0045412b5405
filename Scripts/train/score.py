#!/usr/bin/env python3
"""Scores generated captions and answers against the scene ground truth (scenes.py).

Caption metrics (per scene, then averaged):
  object_accuracy  matched objects / max(#ground truth, #parsed); an object matches when kind,
                   colour, size and position are all right (each ground-truth object used once),
                   so missing, extra and wrong objects all cost. This is "caption accuracy".
  exact            1 if the parsed object set equals the ground truth and the count is right.
  parsed           1 if the caption followed the fixed phrasing (every item parsed).
  attribute        per attribute (kind, colour, size, position): matches after pairing objects
                   by position (the cell), / max(#gt, #parsed).
  count            1 if the stated number of shapes is right.
Question accuracy: normalised exact match (case, surrounding punctuation and whitespace ignored).

Usage as a module: `score_caption(text, scene)`, `score_answer(text, answer)`, `summarise(rows)`.
"""

import re

from scenes import COLOUR_NAMES, KINDS, NUMBERS, POSITION_NAMES, SIZE_NAMES

_ITEM = re.compile(r"^an? (?P<size>\w+) (?P<colour>\w+) (?P<kind>\w+) at the (?P<position>[\w ]+)$")
_HEAD = re.compile(r"^There (?:is|are) (?P<n>\w+) shapes?:\s*(?P<rest>.*)$", re.S)


def parse_caption(text):
    """-> (count or None, [object dicts], all_items_parsed)."""
    text = text.strip()
    m = _HEAD.match(text)
    if not m:
        return None, [], False
    n = NUMBERS.index(m["n"]) if m["n"] in NUMBERS else None
    rest = m["rest"].strip()
    if rest.endswith("."):
        rest = rest[:-1]
    objs, ok = [], True
    for item in [s.strip() for s in rest.split(",") if s.strip()]:
        im = _ITEM.match(item)
        if (not im or im["size"] not in SIZE_NAMES or im["colour"] not in COLOUR_NAMES
                or im["kind"] not in KINDS or im["position"] not in POSITION_NAMES):
            ok = False
            continue
        objs.append({k: im[k] for k in ("size", "colour", "kind", "position")})
    return n, objs, ok


def _key(o):
    return (o["kind"], o["colour"], o["size"], o["position"])


def score_caption(text, scene):
    gt = scene["objects"]
    n, pred, ok = parse_caption(text)
    remaining = [_key(o) for o in gt]
    matched = 0
    for p in pred:
        if _key(p) in remaining:
            remaining.remove(_key(p))
            matched += 1
    denom = max(len(gt), len(pred))
    by_pos = {o["position"]: o for o in pred}
    attr = {}
    for a in ("kind", "colour", "size", "position"):
        hits = sum(1 for o in gt if o["position"] in by_pos and by_pos[o["position"]][a] == o[a])
        attr[a] = hits / denom if denom else 0.0
    return {
        "object_accuracy": matched / denom if denom else 0.0,
        "exact": float(matched == len(gt) == len(pred) and n == len(gt)),
        "parsed": float(ok),
        "count": float(n == len(gt)),
        **{f"attr_{a}": v for a, v in attr.items()},
    }


def normalise(text):
    return re.sub(r"\s+", " ", text.strip().strip(".!?,;:").strip()).lower()


def score_answer(text, answer):
    return float(normalise(text) == normalise(answer))


def summarise(rows):
    """Mean of every numeric field over a list of dicts."""
    if not rows:
        return {}
    keys = rows[0].keys()
    return {k: sum(r[k] for r in rows) / len(rows) for k in keys}


if __name__ == "__main__":
    from scenes import caption, make_scene
    s = make_scene(2_000_004)
    c = caption(s)
    print(c, score_caption(c, s))
    bad = c.replace("blue", "red", 1)
    print(bad, score_caption(bad, s))
    print(score_caption("There are two shapes: a large red circle at the top", s))
    print(score_answer(" yes.", "Yes"), score_answer("No", "Yes"))
