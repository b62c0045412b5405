#!/usr/bin/env python3
"""Trains the tokenizer test models and writes the tokenizer golden files.

Outputs (under Tests/TokenizerTests/Fixtures/):
  sp1k/tokenizer.model, sp1k/tokenizer.json         BPE, vocab 1000, byte fallback (LLaMA-like);
                                                    also the tokenizer of the engine's tiny models
  sp1k/tokenizer-metaspace.json                     same model converted with legacy=False
                                                    (Metaspace pre-tokenizer instead of Prepend+Replace)
  sp1k/tokenizer-variant.json                       Metaspace with split=true and prepend_scheme "always",
                                                    merges in the older "a b" string form
  sp32k/tokenizer.model, sp32k/tokenizer.json       BPE, vocab 32000, byte fallback (LLaMA-like)
  udef/tokenizer.model, udef/tokenizer.json         BPE, vocab 600, NO byte fallback, user-defined and
                                                    control symbols (unknown handling, frozen pieces)
  corpus.jsonl                                      one JSON string per line (newlines survive)
  goldens.json                                      ids and decodes from sentencepiece / tokenizers,
                                                    decodes of arbitrary id lists, prompt ids

Regenerate from the repository root with the pinned venv (see README-tokenizer.md):
  /work/venv/bin/python Scripts/reference/make_tokenizer_goldens.py
"""
import io
import json
import os
import random
import re
import sys
import sysconfig
from pathlib import Path

import sentencepiece as spm
import tokenizers
import transformers
from tokenizers import Tokenizer
from transformers import LlamaTokenizer, LlamaTokenizerFast

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "Tests" / "TokenizerTests" / "Fixtures"
SEED = 20241126


# ----------------------------------------------------------------------------------------------
# Training text: the running interpreter's standard library sources (offline, deterministic for a
# given Python version) plus generated Unicode samples.

def unicode_samples(rng, n):
    cjk = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可也你说年着过之然" \
          "日本語の文章はひらがなとカタカナと漢字で書かれますこんにちは世界東京大阪한국어문장입니다안녕하세요"
    words = ["naïve", "café", "Zürich", "façade", "coöperate", "Ærøskøbing", "Łódź", "straße", "Ελλάδα",
             "Москва", "привет", "مرحبا", "שלום", "नमस्ते", "ภาษาไทย", "Việt Nam", "smörgåsbord"]
    out = []
    for _ in range(n):
        k = rng.randrange(4)
        if k == 0:
            out.append("".join(rng.choice(cjk) for _ in range(rng.randrange(5, 40))))
        elif k == 1:
            out.append(" ".join(rng.choice(words) for _ in range(rng.randrange(3, 12))))
        elif k == 2:
            out.append(" ".join(str(rng.randrange(10 ** rng.randrange(1, 9))) for _ in range(rng.randrange(2, 8))))
        else:
            out.append("The " + rng.choice(words) + " costs " + str(rng.randrange(1000)) + " € or ¥" + str(rng.randrange(99999)))
    return out


def training_lines():
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    lines = []
    for path in sorted(stdlib.glob("*.py")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            line = line.strip()
            if line:
                lines.append(line)
    rng = random.Random(SEED)
    lines += unicode_samples(rng, 20000)
    return lines


def train(lines, prefix, vocab, **extra):
    prefix.parent.mkdir(parents=True, exist_ok=True)
    args = dict(
        sentence_iterator=iter(lines),
        model_prefix=str(prefix),
        model_type="bpe",
        vocab_size=vocab,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=0.99995,
        allow_whitespace_only_pieces=True,
        max_sentence_length=8192,
        input_sentence_size=400000,
        shuffle_input_sentence=True,
        seed_sentencepiece_size=1000000,
        num_threads=2,
        minloglevel=2,
    )
    args.update(extra)
    spm.SentencePieceTrainer.train(**args)
    os.replace(str(prefix) + ".model", prefix.parent / "tokenizer.model")
    os.remove(str(prefix) + ".vocab")


def mark_unused(path, count):
    """Marks the `count` highest-scoring multi-character NORMAL pieces UNUSED, so that the tests
    cover sentencepiece's re-segmentation of merges that produce an unused piece."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    proto = pb.ModelProto()
    proto.ParseFromString(path.read_bytes())
    marked = 0
    for piece in proto.pieces:
        if piece.type == pb.ModelProto.SentencePiece.NORMAL and len(piece.piece) >= 2 and marked < count:
            piece.type = pb.ModelProto.SentencePiece.UNUSED
            marked += 1
    path.write_bytes(proto.SerializeToString())


def write_variant(source, target):
    """A tokenizer.json exercising options transformers does not emit for LLaMA today but older
    files and other converters do."""
    data = json.loads(source.read_text(encoding="utf-8"))
    data["pre_tokenizer"]["split"] = True
    data["pre_tokenizer"]["prepend_scheme"] = "always"
    assert all(" " not in a and " " not in b for a, b in data["model"]["merges"])
    data["model"]["merges"] = [a + " " + b for a, b in data["model"]["merges"]]
    target.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")


def convert(model_dir, legacy, name):
    fast = LlamaTokenizerFast(vocab_file=str(model_dir / "tokenizer.model"), from_slow=True, legacy=legacy,
                              add_prefix_space=True, add_bos_token=True, add_eos_token=False)
    fast.backend_tokenizer.save(str(model_dir / name))


# ----------------------------------------------------------------------------------------------
# Test corpus.

def corpus_lines():
    rng = random.Random(SEED + 1)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    source = []
    for path in sorted(stdlib.glob("*.py"))[:60]:
        source += path.read_text(encoding="utf-8", errors="replace").splitlines()
    source = [l for l in source if l.strip()]
    rare = [chr(c) for c in list(range(0x10000, 0x1005D)) + list(range(0x1D400, 0x1D44F))
            + list(range(0x13000, 0x13040)) + list(range(0xA4D0, 0xA4FF)) + [0x0378 + 1, 0x2FFF, 0xE000, 0xF8FF, 0x10FFFD]]
    emoji = ["😀", "👍", "👍🏽", "🇯🇵", "🏳️‍🌈", "👨‍👩‍👧‍👦", "🧑🏿‍💻", "❤️", "🤷‍♀️", "👩‍❤️‍💋‍👨", "🫠", "#️⃣"]
    combining = ["e\u0301", "a\u0308", "n\u0303", "o\u0302\u0323", "Z\u0351\u0364\u036B", "\u0915\u094D\u0937",
                 "\u1100\u1161\u11A8", "i\u0307", "\u05E9\u05C1", "a\u20DD"]
    cjk = "漢字仮名交じり文中华人民共和国繁體字한글테스트"
    specials = ["<s>", "</s>", "<unk>", "<0x41>", "▁", "▁▁x", "<tool>", "[[x]]", "[[", "<ctrl>", "<image>"]
    ws = [" ", "  ", "   ", "\t", "\t\t", "\n", "\r\n", "\u00A0", "\u3000", "\u2003", "\u200B", "\uFEFF", "\x0b", "\x0c"]
    lines = ["", " ", "  ", "\n", "\t", "a", " a", "a ", "▁", "hello world", "Hello World!", "1234567890",
             "   leading", "trailing   ", "  both  ", "tab\tseparated\tvalues", "line1\nline2\n", "\n\nx\n\n",
             "<s>", "</s>", "<unk>", "<s>hello</s>", " <s> x", "A chat between a curious user and an artificial intelligence assistant."]
    pools = [
        lambda: rng.choice(source),
        lambda: rng.choice(source).strip(),
        lambda: "".join(rng.choice(cjk) for _ in range(rng.randrange(1, 30))),
        lambda: " ".join(rng.choice(emoji) for _ in range(rng.randrange(1, 6))),
        lambda: "".join(rng.choice(emoji) + rng.choice(["", " ", "x"]) for _ in range(rng.randrange(1, 6))),
        lambda: " ".join(rng.choice(combining) + rng.choice(["", "x", "a"]) for _ in range(rng.randrange(1, 8))),
        lambda: "".join(str(rng.randrange(10)) for _ in range(rng.randrange(1, 40))),
        lambda: f"{rng.randrange(10**6)}.{rng.randrange(100)} + {rng.randrange(10**9)} = {rng.random()}",
        lambda: rng.choice(ws) * rng.randrange(1, 5) + rng.choice(source).strip() + rng.choice(ws) * rng.randrange(0, 4),
        lambda: rng.choice(source).strip().replace(" ", rng.choice(ws) * rng.randrange(1, 4)),
        lambda: "\n".join(rng.choice(source) for _ in range(rng.randrange(2, 5))),
        lambda: "".join(rng.choice(rare) for _ in range(rng.randrange(1, 10))),
        lambda: rng.choice(source).strip() + " " + "".join(rng.choice(rare) for _ in range(3)) + " end",
        lambda: rng.choice(specials) + rng.choice(["", " "]) + rng.choice(source).strip() + rng.choice(["", " "]) + rng.choice(specials),
        lambda: "".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(rng.randrange(1, 20))),
        lambda: "".join(chr(rng.choice([rng.randrange(0x20, 0x7F), rng.randrange(0xA0, 0xD7FF), rng.randrange(0xE000, 0x10FFFF)]))
                        for _ in range(rng.randrange(1, 25))),
        lambda: " ".join(rng.choice(source).split()[:3]) * rng.randrange(1, 4),
    ]
    while len(lines) < 2400:
        lines.append(rng.choice(pools)())
    # A few long lines: performance and long-range merges.
    lines.append(" ".join(rng.choice(source).strip() for _ in range(400)))
    lines.append("a" * 5000)
    lines.append("ab" * 3000 + " " * 500 + "😀" * 300)
    # CPython's comments cite its tracker as the word "issue" and a number, which in this repository
    # reads as a reference to the project's own tracker: such lines take CPython's other spelling,
    # "bpo-" and the number. The random draws are unchanged, so every other line stays as it was.
    return [re.sub(r"\b([Ii]ssue) ([0-9])", r"bpo-\2", line) for line in lines]


# ----------------------------------------------------------------------------------------------
# Prompt: LLaVA's vicuna_v1 template and tokenizer_image_token (llava/mm_utils.py), re-implemented.

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
IMAGE_TOKEN_INDEX = -200


def vicuna_v1_prompt(question):
    # conv_vicuna_v1 with roles USER/ASSISTANT, sep " ", sep2 "</s>", SeparatorStyle.TWO:
    # system + " " + "USER: <image>\n{q}" + " " + "ASSISTANT:"
    return SYSTEM + " " + "USER: " + "<image>\n" + question + " " + "ASSISTANT:"


def tokenizer_image_token(prompt, tokenizer, image_token_index=IMAGE_TOKEN_INDEX):
    prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]

    def insert_separator(X, sep):
        return [ele for sublist in zip(X, [sep] * len(X)) for ele in sublist][:-1]

    input_ids = []
    offset = 0
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [image_token_index] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


QUESTIONS = [
    "Describe this image in detail.",
    "What is shown in the picture?",
    "How many people are there in the image?",
    "What color is the car on the left?",
    "Is there a dog? Answer yes or no.",
    "Provide a one-sentence caption for the provided image.",
    "What is written on the sign?\nAnswer the question using a single word or phrase.",
    "Describe the image.  Be concise.",
    "  What time is it on the clock?  ",
    "这张图片里有什么？",
    "この画像について説明してください。",
    "Qu'est-ce que c'est ? Réponds en français.",
    "Count the 🍎 and 🍌 in the image.",
    "What is 12345 + 67890?",
    "\tIndented question with a tab",
    "",
    "A question with a literal </s> inside",
    "<s>Starts with a special token",
    "Spaces ▁ and the metaspace ▁character",
    "Zero-width\u200bjoiner and combining e\u0301 marks",
    "Line one\n\nLine three",
    "<unk>",
]


def same_or(value, reference):
    return None if value == reference else value


def main():
    print("sentencepiece", spm.__version__, "tokenizers", tokenizers.__version__, "transformers", transformers.__version__,
          "python", sys.version.split()[0], file=sys.stderr)
    lines = training_lines()
    print("training lines", len(lines), file=sys.stderr)
    train(lines, FIX / "sp1k" / "m", 1000)
    train(lines, FIX / "sp32k" / "m", 32000)
    train(lines[::4], FIX / "udef" / "m", 600, byte_fallback=False, character_coverage=0.9995,
          remove_extra_whitespaces=True,
          user_defined_symbols=["<tool>", "[[", "[[x]]", "▁▁"], control_symbols=["<ctrl>"])
    mark_unused(FIX / "udef" / "tokenizer.model", count=4)
    for d in ["sp1k", "sp32k", "udef"]:
        convert(FIX / d, legacy=True, name="tokenizer.json")
    convert(FIX / "sp1k", legacy=False, name="tokenizer-metaspace.json")
    write_variant(FIX / "sp1k" / "tokenizer-metaspace.json", FIX / "sp1k" / "tokenizer-variant.json")

    corpus = corpus_lines()
    with open(FIX / "corpus.jsonl", "w", encoding="utf-8") as f:
        for line in corpus:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")

    rng = random.Random(SEED + 2)
    goldens = {"versions": {"sentencepiece": spm.__version__, "tokenizers": tokenizers.__version__,
                            "transformers": transformers.__version__},
               "corpus": "corpus.jsonl", "models": {}}
    for d, jsons in [("sp1k", ["tokenizer.json", "tokenizer-metaspace.json", "tokenizer-variant.json"]), ("sp32k", ["tokenizer.json"]),
                     ("udef", ["tokenizer.json"])]:
        sp = spm.SentencePieceProcessor(model_file=str(FIX / d / "tokenizer.model"))
        n = sp.get_piece_size()
        # Arbitrary id lists for the decoders: control ids, unk, lone and broken byte pieces.
        id_lists = [[], [1], [1, 2], [0], [0, 0, 5], [1, 100, 2, 100], list(range(min(n, 300)))]
        byte_ids = [i for i in range(n) if sp.is_byte(i)]
        for _ in range(60):
            k = rng.randrange(1, 12)
            pool = byte_ids if byte_ids and rng.random() < 0.5 else list(range(n))
            id_lists.append([rng.choice(pool) if rng.random() < 0.8 else rng.randrange(n) for _ in range(k)])
        # To keep the file small, null stands for "equal to the corpus line" in `decoded` and for
        # "equal to the sentencepiece ids" in a tokenizer.json's `ids`.
        sp_ids = [sp.encode(t) for t in corpus]
        entry = {"model": {"vocab_size": n, "bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(),
                           "ids": sp_ids,
                           "decoded": [same_or(sp.decode(ids), t) for ids, t in zip(sp_ids, corpus)],
                           "id_lists": id_lists,
                           "id_list_decoded": [sp.decode(ids) for ids in id_lists]}}
        for j in jsons:
            tok = Tokenizer.from_file(str(FIX / d / j))
            hf_ids = [tok.encode(t, add_special_tokens=False).ids for t in corpus]
            entry[j] = {"ids": [same_or(h, s) for h, s in zip(hf_ids, sp_ids)],
                        "decoded": [same_or(tok.decode(ids), t) for ids, t in zip(hf_ids, corpus)],
                        "id_list_decoded": [tok.decode(ids) for ids in id_lists]}
        goldens["models"][d] = entry

    # Prompt goldens from the slow tokenizer, the way LLaVA loads Vicuna's (legacy=False in its
    # tokenizer_config.json, add_bos_token=True).
    # `same_with_legacy_true` records where that setting matters (special tokens or U+2581 written
    # in the question).
    slow = LlamaTokenizer(vocab_file=str(FIX / "sp32k" / "tokenizer.model"), legacy=False)
    slow_legacy = LlamaTokenizer(vocab_file=str(FIX / "sp32k" / "tokenizer.model"), legacy=True)
    prompts = []
    for q in QUESTIONS:
        ids = tokenizer_image_token(vicuna_v1_prompt(q), slow)
        cut = ids.index(IMAGE_TOKEN_INDEX)
        assert ids.count(IMAGE_TOKEN_INDEX) == 1
        legacy_ids = tokenizer_image_token(vicuna_v1_prompt(q), slow_legacy)
        prompts.append({"question": q, "ids_before_image": ids[:cut], "ids_after_image": ids[cut + 1:],
                        "same_with_legacy_true": legacy_ids == ids})
    goldens["prompts"] = {"model": "sp32k", "legacy": False, "items": prompts}
    with open(FIX / "goldens.json", "w", encoding="utf-8") as f:
        json.dump(goldens, f, ensure_ascii=False, separators=(",", ":"))
    for p in sorted(FIX.rglob("*")):
        if p.is_file():
            print(f"{p.stat().st_size:>10}  {p.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
