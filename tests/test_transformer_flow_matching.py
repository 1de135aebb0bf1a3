"""The flow-matching objective: the target is what the sampler undoes, the shift is the pipeline's own."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from tiny_transformers import FLUX_SCHEDULER, tiny_flux_model, tiny_sd3_model  # noqa: F401 (fixtures)

from sdlora.errors import ConfigError
from sdlora.training.flow_matching import (
    TimestepSampling,
    flow_loss,
    flow_sample,
    flux_image_ids,
    flux_image_seq_len,
    pack_flux_latents,
    sample_sigmas,
    shifted_sigmas,
    unpack_flux_latents,
)

SD3 = FlowMatchEulerDiscreteScheduler(shift=3.0)
FLUX = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("scheduler,seq_len", [(SD3, None), (FLUX, 64), (FLUX, 4096)])
def test_one_euler_step_with_the_true_velocity_lands_on_the_latents(scheduler, seq_len):
    latents = torch.randn(3, 16, 8, 8, generator=generator(1))
    sample = flow_sample(latents, scheduler, TimestepSampling("logit_normal"), generator(2), seq_len)
    for i in range(3):
        # the sampler's Euler step from this sample's (already shifted) sigma straight to sigma 0
        euler = FlowMatchEulerDiscreteScheduler(shift=1.0)  # shift 1: the schedule is taken as given
        euler.set_timesteps(sigmas=[float(sample.sigmas[i])])
        assert euler.sigmas.tolist() == pytest.approx([float(sample.sigmas[i]), 0.0])
        landed = euler.step(sample.target[i : i + 1], euler.timesteps[0], sample.noisy[i : i + 1]).prev_sample
        torch.testing.assert_close(landed, latents[i : i + 1], atol=1e-5, rtol=1e-5)


def test_sd3_shift_bends_mid_sigma_to_three_quarters():
    # shift 3: sigma' = 3s / (1 + 2s), so 0.5 -> 0.75 (training then sees mostly noisier samples)
    assert shifted_sigmas(SD3, torch.tensor([0.5])).item() == pytest.approx(0.75, abs=1e-6)


def test_flux_shift_grows_with_resolution():
    half = torch.tensor([0.5])
    low, high = shifted_sigmas(FLUX, half, 256).item(), shifted_sigmas(FLUX, half, 4096).item()
    # exponential time shift at t=0.5 is e^mu / (e^mu + 1), mu from 0.5 (256 tokens) to 1.15 (4096 tokens)
    assert low == pytest.approx(math.exp(0.5) / (math.exp(0.5) + 1), abs=1e-6)
    assert high == pytest.approx(math.exp(1.15) / (math.exp(1.15) + 1), abs=1e-6)
    assert flux_image_seq_len(128, 128) == 4096  # a 1024 px image: 128x128 latents, 2x2 patches


@pytest.mark.parametrize("which", ["sd3", "flux"])
def test_shift_matches_the_pipelines_own_schedule(which, request):
    folder = request.getfixturevalue(f"tiny_{which}_model")
    pipe = DiffusionPipeline.from_pretrained(folder)
    unshifted = [1.0, 0.7, 0.4, 0.1]
    pipe(
        "a red circle",
        num_inference_steps=4,
        sigmas=unshifted,
        height=32,
        width=32,
        max_sequence_length=16,
        output_type="latent",
        generator=generator(),
    )
    # the pipeline shifted these itself (Flux by the token count of its 16x16 latents); ours must agree
    seq_len = flux_image_seq_len(16, 16) if which == "flux" else None
    ours = shifted_sigmas(pipe.scheduler, torch.tensor(unshifted), seq_len)
    torch.testing.assert_close(ours, pipe.scheduler.sigmas[:-1].float(), atol=1e-6, rtol=0)


def test_sampling_is_a_pure_function_of_the_generator():
    latents = torch.randn(2, 16, 8, 8, generator=generator(1))
    a = flow_sample(latents, SD3, TimestepSampling(), generator(5))
    b = flow_sample(latents, SD3, TimestepSampling(), generator(5))
    c = flow_sample(latents, SD3, TimestepSampling(), generator(6))
    assert torch.equal(a.noisy, b.noisy) and torch.equal(a.sigmas, b.sigmas)
    assert not torch.equal(a.noisy, c.noisy) and not torch.equal(a.sigmas, c.sigmas)
    torch.testing.assert_close(a.timesteps, a.sigmas * 1000)


def test_logit_normal_favours_mid_sigmas_and_uniform_does_not():
    flat = FlowMatchEulerDiscreteScheduler(shift=1.0)  # no shift: we see the scheme's own draw

    def middle_share(scheme: str) -> float:
        sigmas = sample_sigmas(flat, 4000, TimestepSampling(scheme), generator(3))
        return ((sigmas > 0.2689) & (sigmas < 0.7311)).float().mean().item()  # sigmoid(+-1)

    assert middle_share("logit_normal") == pytest.approx(0.683, abs=0.03)  # P(|z| < 1)
    assert middle_share("uniform") == pytest.approx(0.462, abs=0.03)


def test_loss_is_zero_for_the_true_velocity_and_weighted_by_scheme():
    latents = torch.randn(2, 16, 4, 4, generator=generator(1))
    sample = flow_sample(latents, SD3, TimestepSampling("sigma_sqrt"), generator(2))
    assert torch.equal(flow_loss(sample.target, sample, TimestepSampling("sigma_sqrt")), torch.zeros(2))
    off = sample.target + 1.0  # an error of exactly 1 everywhere
    flat = flow_loss(off, sample, TimestepSampling("uniform"))
    weighted = flow_loss(off, sample, TimestepSampling("sigma_sqrt"))
    torch.testing.assert_close(flat, torch.ones(2))
    torch.testing.assert_close(weighted, sample.sigmas**-2)


def test_unknown_scheme_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="weighting_scheme 'lognorm' is unknown"):
        TimestepSampling("lognorm")


def test_flux_packing_puts_each_2x2_patch_in_one_token_and_round_trips():
    latents = torch.randn(2, 16, 6, 8, generator=generator(1))
    tokens = pack_flux_latents(latents)
    assert tokens.shape == (2, 3 * 4, 64)
    # token (row 1, column 2) holds the 16 channels of latents[1:3... 4:6] patch, channel-major
    torch.testing.assert_close(tokens[:, 1 * 4 + 2], latents[:, :, 2:4, 4:6].reshape(2, 64))
    assert torch.equal(unpack_flux_latents(tokens, 6, 8), latents)
    ids = flux_image_ids(6, 8, "cpu", torch.float32)
    assert ids.shape == (12, 3) and ids[1 * 4 + 2].tolist() == [0.0, 1.0, 2.0]
