"""The demo tokenizer: one token per caption word, byte fallback, and a classic CLIP reload."""

from __future__ import annotations

from transformers import CLIPTokenizer

from sdlora.demo.shapes import base_scene
from sdlora.demo.tokenizer import TRIGGER_WORDS, WORDS, build_vocab, save_tokenizer


def test_every_caption_word_is_one_token(tmp_path):
    tokenizer = save_tokenizer(tmp_path)
    for word in WORDS:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word


def test_captions_tokenize_word_for_word(tmp_path):
    tokenizer = save_tokenizer(tmp_path)
    for index in range(50):
        caption = base_scene(0, index).caption()
        ids = tokenizer(caption, add_special_tokens=False).input_ids
        assert len(ids) == len(caption.split())


def test_trigger_words_are_single_tokens(tmp_path):
    tokenizer = save_tokenizer(tmp_path)
    assert all(len(tokenizer(w, add_special_tokens=False).input_ids) == 1 for w in TRIGGER_WORDS)


def test_unknown_words_fall_back_to_bytes(tmp_path):
    tokenizer = save_tokenizer(tmp_path)
    ids = tokenizer("zebra Ünïcode 🙂 42", add_special_tokens=False).input_ids
    assert ids and tokenizer.unk_token_id not in ids


def test_vocab_has_all_bytes_and_word_end_forms():
    vocab, _ = build_vocab()
    singles = [t for t in vocab if len(t) == 1]
    assert len(singles) == 256
    assert all(t + "</w>" in vocab for t in singles)


def test_classic_files_reload_with_clip_tokenizer(tmp_path):
    save_tokenizer(tmp_path)
    assert (tmp_path / "vocab.json").exists() and (tmp_path / "merges.txt").exists()
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    assert reloaded.model_max_length == 77
    assert reloaded("a green star").input_ids[-1] == reloaded.eos_token_id
