#!/usr/bin/env python3
"""Trains the scene model's SentencePiece BPE tokenizer on the domain text.

LLaMA conventions: unk 0, bos 1, eos 2, no pad, byte fallback, dummy prefix, identity
normalisation, digits split (same trainer settings as Scripts/reference/make_tokenizer_goldens.py).
Corpus: the vicuna_v1 system prompt and role names, every object phrase, and the captions,
questions and answers of the first `--scenes` training scenes (never val or test scenes).
Deterministic for a given sentencepiece version (single thread, no shuffling).

Usage:  python train_tokenizer.py --out Scripts/train/tokenizer [--vocab 512]
"""

import argparse
import os
import random

import sentencepiece as spm

import scenes


def corpus(n_scenes):
    lines = scenes.domain_text()
    lines += [scenes.SYSTEM] * 300 + ["USER: ASSISTANT:"] * 300
    rng = random.Random(0)
    for i in range(n_scenes):
        s = scenes.make_scene(scenes.scene_index("train", i))
        lines.append(scenes.caption(s))
        for q, a, _ in scenes.questions(s, k=3, salt=rng.randrange(1 << 30)):
            lines += [q, a]
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--scenes", type=int, default=5000)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    prefix = os.path.join(args.out, "m")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus(args.scenes)),
        model_prefix=prefix,
        model_type="bpe",
        vocab_size=args.vocab,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=1.0,
        allow_whitespace_only_pieces=True,
        shuffle_input_sentence=False,
        num_threads=1,
        minloglevel=2,
    )
    os.replace(prefix + ".model", os.path.join(args.out, "tokenizer.model"))
    os.remove(prefix + ".vocab")
    sp = spm.SentencePieceProcessor(model_file=os.path.join(args.out, "tokenizer.model"))
    s = scenes.make_scene(scenes.scene_index("train", 3))
    for text in (scenes.SYSTEM, scenes.caption(s)):
        pieces = sp.encode(text, out_type=str)
        print(len(pieces), pieces)
    print("vocab", sp.get_piece_size(), "bos", sp.bos_id(), "eos", sp.eos_id(), "unk", sp.unk_id())


if __name__ == "__main__":
    main()
