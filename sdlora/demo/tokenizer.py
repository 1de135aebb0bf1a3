"""A tiny CLIP-compatible BPE tokenizer: one token per caption word, bytes for everything else."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import CLIPTokenizer

from sdlora.demo.shapes import BACKGROUNDS, BASE_COLOURS, BASE_SHAPES, NEW_COLOURS, NEW_SHAPES, TEXTURES

TRIGGER_WORDS = ("sks", "ohwx")
# Caption words, words for the LoRA concepts, and a few words people type into prompts.
WORDS = (
    ("a", "an", "on", "the", "of", "and", "with", "in", "background", "shape", "photo", "picture", "grey")
    + tuple(BASE_COLOURS)
    + tuple(NEW_COLOURS)
    + tuple(BACKGROUNDS)
    + BASE_SHAPES
    + NEW_SHAPES
    + tuple(t for t in TEXTURES if t != "plain")
    + TRIGGER_WORDS
)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77


def byte_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes, in byte order."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    spare = 0
    chars = []
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:  # unprintable bytes borrow code points above 255, in order
            chars.append(chr(256 + spare))
            spare += 1
    return chars


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Greedy lowest-rank-first BPE, the way CLIP applies its merges."""
    while len(symbols) > 1:
        pairs = [(ranks.get(p, 1 << 30), i) for i, p in enumerate(zip(symbols, symbols[1:], strict=False))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2 :]
    return symbols


def build_vocab(words: tuple[str, ...] = WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges giving each word exactly one token.

    Each word's merges are appended after all earlier ones, starting from however the
    earlier merges already split it; since a finished word never reaches a later merge,
    adding words cannot break the ones before (naive per-word merges can: "re" from
    "red" once split "green" into three tokens).
    """
    alphabet = byte_alphabet()
    vocab_list = alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(words):
        symbols = _apply_merges(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab_list.append(pair[0] + pair[1])
            symbols = [pair[0] + pair[1]] + symbols[2:]
    vocab_list += [BOS, EOS]
    return {token: i for i, token in enumerate(dict.fromkeys(vocab_list))}, merges


def write_vocab_files(folder: Path) -> None:
    """Write the classic CLIP tokenizer files, vocab.json and merges.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def save_tokenizer(folder: Path) -> CLIPTokenizer:
    """Write vocab.json, merges.txt and config to `folder` and return the reloaded tokenizer."""
    write_vocab_files(folder)
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    check_tokenizer(tokenizer)
    return tokenizer


def check_tokenizer(tokenizer: CLIPTokenizer) -> None:
    """Raise if any known word is not one token or an unknown word cannot be encoded."""
    for word in WORDS:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ValueError(f"word {word!r} tokenizes to {len(ids)} tokens: {ids}")
    ids = tokenizer("zebra Ünïcode 123 !?", add_special_tokens=False).input_ids
    if not ids or tokenizer.unk_token_id in ids:
        raise ValueError("byte-level fallback failed on an unknown word")
