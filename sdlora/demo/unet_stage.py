"""The demo build's diffusion stages: cache base-image latents, then train text encoder + UNet."""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPTokenizer

from sdlora.demo.components import make_train_scheduler
from sdlora.demo.run import BuildConfig, Run, images_tensor, log
from sdlora.demo.shapes import base_scene
from sdlora.demo.state import BuildState, Ema


def _cache_path(cfg: BuildConfig):
    return cfg.work / f"cache-{cfg.cache_images}.pt"


def _token_ids(tokenizer: CLIPTokenizer, texts: list[str]) -> torch.Tensor:
    """Token ids padded to the full context, exactly as the pipeline pads prompts."""
    return tokenizer(
        texts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


@torch.no_grad()
def build_cache(state: BuildState, cfg: BuildConfig, tokenizer: CLIPTokenizer) -> dict[str, torch.Tensor]:
    """Encode the base images once (posterior mean and std) and tokenize both caption forms."""
    path = _cache_path(cfg)
    fingerprint = torch.tensor(sum(p.double().sum().item() for p in state.vae.encoder.parameters()))
    if path.exists():
        cache = torch.load(path, weights_only=True)
        if "vae_fingerprint" in cache and torch.equal(cache["vae_fingerprint"], fingerprint):
            return cache
        log("latent cache is from another VAE; rebuilding it")
    log(f"caching {cfg.cache_images} latents")
    state.vae.eval()
    means, stds, captions = [], [], []
    for start in range(0, cfg.cache_images, 256):
        scenes = [base_scene(cfg.seed + 2, i) for i in range(start, min(start + 256, cfg.cache_images))]
        posterior = state.vae.encode(images_tensor(scenes)).latent_dist
        means.append(posterior.mean.half())
        stds.append(posterior.std.half())
        captions += [(s.caption(long=False), s.caption(long=True)) for s in scenes]
    cache = {
        "mean": torch.cat(means),
        "std": torch.cat(stds),
        "short": _token_ids(tokenizer, [c[0] for c in captions]),
        "long": _token_ids(tokenizer, [c[1] for c in captions]),
        "empty": _token_ids(tokenizer, [""]),
        "vae_fingerprint": fingerprint,
    }
    torch.save(cache, path)
    log(f"cached latents: mean std {cache['mean'].float().std():.3f}")
    return cache


def _batch(cache: dict, cfg: BuildConfig, step: int, scaling: float):
    """The step's latents and token ids, drawn from a generator seeded by the step (resumable)."""
    gen = torch.Generator().manual_seed(cfg.seed * 104729 + step)
    idx = torch.randint(len(cache["mean"]), (cfg.unet_batch,), generator=gen)
    mean, std = cache["mean"][idx].float(), cache["std"][idx].float()
    latents = (mean + std * torch.randn(mean.shape, generator=gen)) * scaling
    form = torch.rand(cfg.unet_batch, generator=gen)
    ids = torch.where(
        (form < cfg.empty_caption)[:, None],
        cache["empty"].expand(cfg.unet_batch, -1),
        torch.where(
            (form < cfg.empty_caption + cfg.short_caption)[:, None], cache["short"][idx], cache["long"][idx]
        ),
    )
    noise = torch.randn(latents.shape, generator=gen)
    timesteps = torch.randint(0, 1000, (cfg.unet_batch,), generator=gen)
    return latents, ids, noise, timesteps


def train_unet(
    state: BuildState, cfg: BuildConfig, run: Run, tokenizer: CLIPTokenizer
) -> tuple[list[float], float]:
    """Train until the next export is due, the budget ends or the step target is reached."""
    cache = build_cache(state, cfg, tokenizer)
    params = list(state.unet.parameters()) + list(state.text_encoder.parameters())
    if state.unet_opt is None:
        state.unet_opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.0)
        if state.pending_opt.get("unet"):
            state.unet_opt.load_state_dict(state.pending_opt.pop("unet"))
    scheduler = make_train_scheduler()
    emas = [
        Ema(state.ema_unet, state.unet, cfg.ema_decay),
        Ema(state.ema_text_encoder, state.text_encoder, cfg.ema_decay),
    ]
    state.unet.train()
    state.text_encoder.train()
    scaling = state.vae.config.scaling_factor
    step, losses, tic = state.steps.get("unet", 0), [], time.monotonic()
    while step < cfg.unet_steps and not run.out_of_time():
        latents, ids, noise, timesteps = _batch(cache, cfg, step, scaling)
        for group in state.unet_opt.param_groups:
            group["lr"] = cfg.unet_lr * min(1.0, (step + 1) / cfg.unet_warmup)
        hidden = state.text_encoder(ids)[0]
        pred = state.unet(scheduler.add_noise(latents, noise, timesteps), timesteps, hidden).sample
        loss = F.mse_loss(pred, noise)
        state.unet_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        state.unet_opt.step()
        for ema in emas:
            ema.update(step)
        step += 1
        state.steps["unet"] = step
        losses.append(loss.item())
        if step % 50 == 0:
            log(f"unet step {step} loss {np.mean(losses[-50:]):.4f}")
        if run.due("last_checkpoint", cfg.checkpoint_minutes):
            state.save(cfg.work / "checkpoint.pt")
        if run.due("last_export", cfg.export_minutes):
            break
    return losses, tic
