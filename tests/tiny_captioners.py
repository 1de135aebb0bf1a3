"""Tiny BLIP and Florence-2 captioners with random weights, saved like hub checkpoints (no download).

Each folder holds what from_pretrained reads for the real ones: config, weights, generation
config, tokenizer (a vocabulary written here) and image processor (at a few pixels).
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = "a photo of the red star circle on white background with".split()


def save_tiny_blip(folder: Path) -> Path:
    """A BlipForConditionalGeneration of two 32-wide layers per tower, reading 32 px images."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(special + WORDS)}, bos_token="[DEC]")
    layers = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = BlipConfig(
        text_config={
            **layers,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 96,
            "pad_token_id": 0,
            "sep_token_id": 3,
            "eos_token_id": 3,
            "bos_token_id": 5,
        },
        vision_config={**layers, "image_size": 32, "patch_size": 8},
        projection_dim=32,
    )
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config)
    with torch.no_grad():  # random weights may write [SEP] first, an empty caption; real ones write a line
        model.text_decoder.cls.predictions.bias[tokenizer.sep_token_id] = -5.0
    model.save_pretrained(folder)
    BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer
    ).save_pretrained(folder)
    return folder


def save_tiny_florence2(folder: Path) -> Path:
    """A Florence2ForConditionalGeneration: a four-stage 8-32 wide DaViT at 64 px and a one-layer BART."""
    from transformers import (
        BartTokenizer,
        CLIPImageProcessor,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
    )

    special = ["<s>", "<pad>", "</s>", "<unk>"]
    # byte-level BPE: "Ġ" marks a word after a space; no merges, so every word is one token
    vocab = {token: i for i, token in enumerate(special + WORDS + ["Ġ" + w for w in WORDS] + ["<image>"])}
    tokenizer = BartTokenizer(vocab=vocab, merges=[], extra_special_tokens={"image_token": "<image>"})
    # 64 px through strides 4, 2, 2, 2 is a 2x2 grid, plus one pooled token: five image tokens
    images = CLIPImageProcessor(size={"height": 64, "width": 64}, do_center_crop=False, image_seq_length=5)
    text = {
        "vocab_size": len(tokenizer),
        "d_model": 32,
        "encoder_layers": 1,
        "decoder_layers": 1,
        "encoder_attention_heads": 2,
        "decoder_attention_heads": 2,
        "encoder_ffn_dim": 37,
        "decoder_ffn_dim": 37,
        "max_position_embeddings": 128,
        "bos_token_id": 0,
        "pad_token_id": 1,
        "eos_token_id": 2,
        "decoder_start_token_id": 2,
    }
    vision = {
        "depths": (1, 1, 1, 1),
        "embed_dim": (8, 16, 16, 32),
        "num_heads": (1, 1, 1, 1),
        "num_groups": (1, 1, 1, 1),
        "window_size": 2,
        "projection_dim": 32,
        "max_position_embeddings": 8,
        "max_temporal_embeddings": 4,
    }
    config = Florence2Config(text_config=text, vision_config=vision, image_token_id=tokenizer.image_token_id)
    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration(config)
    model.generation_config.min_new_tokens = 3  # random weights may end at once; real ones write a line
    model.save_pretrained(folder)
    Florence2Processor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder
