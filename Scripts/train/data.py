"""Tokenisation and batching of scene conversations (vicuna_v1, DYNAMIC_LLAVA.md section 1).

First turn: exactly what the engine feeds at inference. LLaVA's `tokenizer_image_token` on
    SYSTEM + " USER: <image>\\n" + question + " ASSISTANT:"
with the slow LlamaTokenizer (legacy=False, as LLaVA-1.5 checkpoints configure it): BOS once,
then the image where `<image>` was. The answer follows as sp.encode(answer) + EOS (the same ids
the tokenizer gives to " answer" after "ASSISTANT:"), and carries the loss.
Later turns (question-only conversations have 2-3 turns): sp.encode("USER: q ASSISTANT:") without
loss, then the answer with loss. The last answer is the output-token gate's span in stage 2.
"""

import random

import numpy as np
import sentencepiece as spm
import torch
from transformers import LlamaTokenizer

import scenes
from model import Batch

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
IMAGE_TOKEN_INDEX = -200
IGNORE = -100


def pixels(img):
    """336x336 RGB PIL image -> normalised [3, 336, 336] float32. The image is already square at
    the CLIP size, so LLaVA's pad-to-square and the bicubic resize / centre crop are identities
    (checked against CLIPImageProcessor in eval_reference.py)."""
    a = (np.asarray(img, dtype=np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD
    return torch.from_numpy(a.transpose(2, 0, 1).copy())


def vicuna_v1_prompt(question):
    return scenes.SYSTEM + " USER: <image>\n" + question + " ASSISTANT:"


class SceneTokenizer:
    def __init__(self, model_file):
        self.sp = spm.SentencePieceProcessor(model_file=model_file)
        self.slow = LlamaTokenizer(vocab_file=model_file, legacy=False)
        self.bos, self.eos = self.sp.bos_id(), self.sp.eos_id()
        self.vocab_size = self.sp.get_piece_size()
        before, _ = self.prompt(scenes.DESCRIBE)
        self.prefix = before

    def prompt(self, question):
        """-> (ids before the image, ids after it) for a first turn."""
        chunks = [self.slow(c).input_ids for c in vicuna_v1_prompt(question).split("<image>")]
        assert len(chunks) == 2 and chunks[0][0] == self.bos and chunks[1][0] == self.bos
        return chunks[0], chunks[1][1:]

    def encode(self, text):
        return self.sp.encode(text)

    def decode(self, ids):
        return self.sp.decode([i for i in ids if i != self.eos])


def build_suffix(tok, turns):
    """turns [(question, answer)] -> (suffix ids, labels, gate) after the image."""
    ids, labels, gate = [], [], []
    for k, (q, a) in enumerate(turns):
        if k == 0:
            before, after = tok.prompt(q)
            assert before == tok.prefix, "every first turn must share the prefix"
            instr = after
        else:
            instr = tok.encode("USER: " + q + " ASSISTANT:")
        ans = tok.encode(a) + [tok.eos]
        ids += instr + ans
        labels += [IGNORE] * len(instr) + ans
        gate = [False] * (len(ids) - len(ans)) + [True] * len(ans)  # only the last answer
    return ids, labels, gate


def collate(tok, items, patch_labels=None):
    """items [(pixels [3,S,S], (ids, labels, gate))] -> Batch, suffixes right-padded.
    patch_labels: per item int64 [3, N] (scenes.patch_labels), for the vision probe; or None."""
    a = max(len(s[0]) for _, s in items)
    b = len(items)
    suffix = torch.zeros(b, a, dtype=torch.long)
    valid = torch.zeros(b, a, dtype=torch.bool)
    labels = torch.full((b, a), IGNORE, dtype=torch.long)
    gate = torch.zeros(b, a, dtype=torch.bool)
    for r, (_, (ids, lab, g)) in enumerate(items):
        n = len(ids)
        suffix[r, :n] = torch.tensor(ids)
        valid[r, :n] = True
        labels[r, :n] = torch.tensor(lab)
        gate[r, :n] = torch.tensor(g)
    return Batch(prefix=torch.tensor(tok.prefix), pixels=torch.stack([p for p, _ in items]),
                 suffix=suffix, suffix_valid=valid, labels=labels, gate=gate,
                 patch_labels=None if patch_labels is None else torch.from_numpy(np.stack(patch_labels)))


def training_batch(tok, seed, step, batch_size, train_scenes, patch_size=None):
    """The batch of a given step: a pure function of (seed, step), so a resumed run sees the same
    data stream as an uninterrupted one. Rendering is the data loader's cost, so every rendered
    scene gives two rows: the picture and its left-right mirror image (scenes.mirror), each with
    its own conversation. With `patch_size`, the batch carries the per-patch object labels for the
    vision probe."""
    rng = random.Random(seed * 1_000_003 + step)
    items, patch_labels = [], []
    while len(items) < batch_size:
        scene = scenes.make_scene(scenes.scene_index("train", rng.randrange(train_scenes)))
        picture = pixels(scenes.render(scene))
        for view, px in ((scene, picture), (scenes.mirror(scene), picture.flip(-1))):
            if len(items) == batch_size:
                break
            items.append((px, build_suffix(tok, scenes.conversation(view, rng))))
            if patch_size:
                patch_labels.append(scenes.patch_labels(scene, patch_size) if view is scene
                                    else _mirrored_patch_labels(scenes.patch_labels(scene, patch_size)))
    return collate(tok, items, patch_labels if patch_size else None)


def _mirrored_patch_labels(labels):
    """[3, N] per-patch labels of a picture -> those of its left-right mirror image."""
    g = int(round(labels.shape[1] ** 0.5))
    return labels.reshape(3, g, g)[:, :, ::-1].reshape(3, g * g).copy()


def eval_items(split, count, start=0):
    """Fixed evaluation set: for each scene, the caption task and one question."""
    out = []
    for k in range(start, start + count):
        scene = scenes.make_scene(scenes.scene_index(split, k))
        q, a, t = scenes.questions(scene, k=1)[0]
        out.append((scene, q, a, t))
    return out
