"""The tiny SD3 and Flux.1 pipelines: diffusers folders that load and draw in seconds on a CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline
from tiny_transformers import IMAGE_SIZE, tiny_flux_model, tiny_sd3_model  # noqa: F401 (fixtures)
from transformers import T5Tokenizer


@pytest.mark.parametrize("which,kind", [("sd3", StableDiffusion3Pipeline), ("flux", FluxPipeline)])
def test_tiny_pipeline_loads_from_its_folder_and_draws_a_32px_image(which, kind, request):
    pipe = DiffusionPipeline.from_pretrained(request.getfixturevalue(f"tiny_{which}_model"))
    assert isinstance(pipe, kind)
    assert pipe.vae.config.latent_channels == 16 and pipe.vae.config.shift_factor != 0

    def draw(seed: int):
        generator = torch.Generator().manual_seed(seed)
        return pipe(
            "a red circle", num_inference_steps=2, height=IMAGE_SIZE, width=IMAGE_SIZE, generator=generator
        )

    first, again, other = (np.asarray(draw(s).images[0], dtype=np.int16) for s in (0, 0, 1))
    assert first.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert np.array_equal(first, again) and not np.array_equal(first, other)


def test_flux_has_a_guidance_embedding_and_a_resolution_dependent_shift(tiny_flux_model):  # noqa: F811
    pipe = FluxPipeline.from_pretrained(tiny_flux_model)
    assert pipe.transformer.config.guidance_embeds
    assert pipe.scheduler.config.use_dynamic_shifting and pipe.scheduler.config.max_shift == 1.15


def test_t5_tokenizer_built_here_tokenizes_like_t5(tiny_sd3_model):  # noqa: F811
    tokenizer = T5Tokenizer.from_pretrained(tiny_sd3_model / "tokenizer_3")
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    ids = tokenizer("a red circle", padding="max_length", max_length=12).input_ids
    assert len(ids) == 12 and ids[-1] == tokenizer.pad_token_id
    assert tokenizer.eos_token_id in ids and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a red circle"
