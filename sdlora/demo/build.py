"""Build the demo model from scratch: `python -m sdlora.demo.build [--budget-minutes N]`.

Stages: vae1, vae2 (autoencoder on a wide range of images), decoder (the decoder alone,
encoder frozen, so latents keep their meaning), cache (encode the base dataset), unet
(text encoder + UNet with EMA). The run checkpoints to build/demo/,
exports assets/demo-model/ every few minutes, and stops cleanly on SIGINT/SIGTERM or
when its time budget is spent; running the same command again carries on.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sdlora.demo import records
from sdlora.demo.components import export_pipeline, make_pipeline
from sdlora.demo.concepts import CONCEPTS, concept_scenes
from sdlora.demo.run import BuildConfig, Run, images_tensor, log
from sdlora.demo.shapes import base_scene, wide_scene
from sdlora.demo.state import STAGES, BuildState, fresh_state, load_checkpoint, load_exported
from sdlora.demo.tokenizer import save_tokenizer
from sdlora.demo.unet_stage import build_cache, train_unet


def train_vae(state: BuildState, cfg: BuildConfig, run: Run) -> None:
    """Stage vae1/vae2: reconstruct half base images, half anything-goes images."""
    which = 0 if state.stage == "vae1" else 1
    if state.vae_opt is None:
        state.vae_opt = torch.optim.AdamW(state.vae.parameters(), lr=cfg.vae_lr[which], weight_decay=0.0)
        if state.pending_opt.get("vae"):
            state.vae_opt.load_state_dict(state.pending_opt.pop("vae"))

    def one_step(step: int) -> torch.Tensor:
        base = [base_scene(cfg.seed + 1, step * cfg.vae_batch + k) for k in range(cfg.vae_batch // 2)]
        wide = [wide_scene(cfg.seed + 1, step * cfg.vae_batch + k) for k in range(cfg.vae_batch // 2)]
        x = images_tensor(base + wide)
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + step + 1_000_000 * which)
        posterior = state.vae.encode(x).latent_dist
        recon = state.vae.decode(posterior.sample(generator=gen)).sample
        return (
            F.mse_loss(recon, x)
            + 0.5 * F.l1_loss(recon, x)
            + cfg.vae_kl[which] * posterior.kl().mean() / x[0].numel()
        )

    _run_vae_stage(state, cfg, run, cfg.vae_steps[which], one_step)


def train_decoder(state: BuildState, cfg: BuildConfig, run: Run) -> None:
    """Stage decoder: the decoder alone on base, anything-goes and LoRA-concept-like images."""
    frozen = [*state.vae.encoder.parameters(), *state.vae.quant_conv.parameters()]
    for p in frozen:
        p.requires_grad_(False)
    if state.vae_opt is None:
        trainable = [p for p in state.vae.parameters() if p.requires_grad]
        state.vae_opt = torch.optim.AdamW(trainable, lr=cfg.decoder_lr, weight_decay=0.0)
        if state.pending_opt.get("vae"):
            state.vae_opt.load_state_dict(state.pending_opt.pop("vae"))

    def one_step(step: int) -> torch.Tensor:
        quarter = cfg.vae_batch // 4
        scenes = [base_scene(cfg.seed + 3, step * cfg.vae_batch + k) for k in range(quarter)]
        scenes += [wide_scene(cfg.seed + 3, step * cfg.vae_batch + k) for k in range(2 * quarter)]
        scenes += concept_scenes(CONCEPTS[step % len(CONCEPTS)], seed=cfg.seed + 1000 + step, count=quarter)
        x = images_tensor(scenes)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(cfg.seed * 7919 + step + 2_000_000)
            latents = state.vae.encode(x).latent_dist.sample(generator=gen)
        recon = state.vae.decode(latents).sample
        return F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)

    try:
        _run_vae_stage(state, cfg, run, cfg.decoder_steps, one_step)
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _run_vae_stage(
    state: BuildState, cfg: BuildConfig, run: Run, total: int, loss_at: Callable[[int], torch.Tensor]
) -> None:
    """Optimise `loss_at(step)` until the stage has `total` steps or the run is out of time."""
    state.vae.train()
    step, losses, tic = state.steps.get(state.stage, 0), [], time.monotonic()
    while step < total and not run.out_of_time():
        loss = loss_at(step)
        state.vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        state.vae_opt.step()
        step += 1
        losses.append(loss.item())
        state.steps[state.stage] = step
        if step % 25 == 0:
            log(f"{state.stage} step {step} loss {np.mean(losses[-25:]):.4f}")
        if run.due("last_checkpoint", cfg.checkpoint_minutes):
            state.save(cfg.work / "checkpoint.pt")
    _finish_stage_slice(state, cfg, tic, losses, step >= total)


def _finish_stage_slice(state: BuildState, cfg: BuildConfig, tic: float, losses: list, done: bool) -> None:
    """Account wall time, record the figures and advance if the stage is complete."""
    seconds = time.monotonic() - tic
    state.seconds[state.stage] = state.seconds.get(state.stage, 0.0) + seconds
    extra = {}
    if state.stage in ("vae1", "vae2", "decoder"):
        extra["psnr_db"] = records.vae_psnr(state.vae, cfg.seed + 99, min(64, cfg.measure_images))
    records.append_row(cfg.doc, state.stage, state.steps.get(state.stage, 0), seconds, losses, extra)
    if done:
        if state.stage == "vae2":
            records.set_scaling_factor(state.vae, cfg.seed + 98, cfg.measure_images)
        state.next_stage()
    state.save(cfg.work / "checkpoint.pt")


def main(argv: list[str] | None = None) -> None:
    """Parse flags, restore or start the build, and run stages until done or out of time."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-minutes", type=float, default=None, help="stop cleanly after this long")
    parser.add_argument("--unet-steps", type=int, default=BuildConfig.unet_steps)
    parser.add_argument("--vae-steps", type=int, nargs=2, default=BuildConfig.vae_steps)
    parser.add_argument("--decoder-steps", type=int, default=BuildConfig.decoder_steps)
    parser.add_argument("--cache-images", type=int, default=BuildConfig.cache_images)
    parser.add_argument("--out", type=Path, default=BuildConfig.out)
    parser.add_argument("--work", type=Path, default=BuildConfig.work)
    parser.add_argument("--doc", type=Path, default=BuildConfig.doc)
    parser.add_argument("--eval-per-pair", type=int, default=BuildConfig.eval_per_pair)
    # Smaller batches and measurements than the recipe's: for the tests, which check the stages, not the model.
    parser.add_argument("--vae-batch", type=int, default=BuildConfig.vae_batch, help="a multiple of 4")
    parser.add_argument("--unet-batch", type=int, default=BuildConfig.unet_batch)
    parser.add_argument("--measure-images", type=int, default=BuildConfig.measure_images)
    args = parser.parse_args(argv)
    cfg = BuildConfig(
        out=args.out,
        work=args.work,
        budget_minutes=args.budget_minutes,
        unet_steps=args.unet_steps,
        vae_steps=tuple(args.vae_steps),
        decoder_steps=args.decoder_steps,
        cache_images=args.cache_images,
        doc=args.doc,
        eval_per_pair=args.eval_per_pair,
        vae_batch=args.vae_batch,
        unet_batch=args.unet_batch,
        measure_images=args.measure_images,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    run = Run(cfg)
    try:
        _build(cfg, run)
    finally:
        run.close()
        torch.set_num_threads(threads)


def _build(cfg: BuildConfig, run: Run) -> None:
    """Run stages until the build is done or out of time."""
    tokenizer = save_tokenizer(cfg.work / "tokenizer")
    state = _restore(cfg, tokenizer)
    log(f"resuming at stage {state.stage}, steps {state.steps}")
    while state.stage != "done" and not run.out_of_time():
        if state.stage in ("vae1", "vae2"):
            train_vae(state, cfg, run)
        elif state.stage == "decoder":
            train_decoder(state, cfg, run)
        elif state.stage == "cache":
            build_cache(state, cfg, tokenizer)
            state.next_stage()
        else:
            losses, tic = train_unet(state, cfg, run, tokenizer)
            _finish_unet(state, cfg, run, tokenizer, tic, losses)
    log(f"stopped at stage {state.stage}, steps {state.steps}")


def _restore(cfg: BuildConfig, tokenizer) -> BuildState:
    """The checkpoint if there is one, else the exported model, else a fresh start."""
    checkpoint = cfg.work / "checkpoint.pt"
    if checkpoint.exists():
        state = load_checkpoint(checkpoint, tokenizer)
        if state.stage == "done" and state.steps.get("unet", 0) < cfg.unet_steps:
            state.stage = "unet"  # asked for more steps than the finished build had
    elif (cfg.out / "model_index.json").exists():
        log(f"no checkpoint; continuing from the weights in {cfg.out}")
        state = load_exported(cfg.out, tokenizer)
    else:
        return fresh_state(tokenizer, cfg.seed)
    if "decoder" not in state.steps and STAGES.index(state.stage) > STAGES.index("decoder"):
        # Built before the decoder stage existed: it leaves the latents as they are, so catch it up.
        log(f"catching up stage decoder, then back to {state.stage}")
        state.return_to, state.stage = state.stage, "decoder"
    return state


def _finish_unet(state: BuildState, cfg: BuildConfig, run: Run, tokenizer, tic: float, losses: list) -> None:
    """Export, checkpoint, score and record one slice of UNet training."""
    seconds = time.monotonic() - tic
    state.seconds["unet"] = state.seconds.get("unet", 0.0) + seconds
    export(state, cfg, tokenizer)
    if state.steps.get("unet", 0) >= cfg.unet_steps:
        state.next_stage()
    state.save(cfg.work / "checkpoint.pt")  # before the slow evaluation, in case a kill follows a stop signal
    scores = (
        {} if run.stop_requested or not cfg.eval_per_pair else records.quick_eval(cfg.out, cfg.eval_per_pair)
    )
    records.append_row(cfg.doc, "unet", state.steps.get("unet", 0), seconds, losses, scores)


def export(state: BuildState, cfg: BuildConfig, tokenizer) -> None:
    """Write the EMA weights as the usable diffusers folder."""
    pipe = make_pipeline(state.vae, state.ema_text_encoder, tokenizer, state.ema_unet)
    info = {"steps": state.steps, "seconds": state.seconds, "seed": cfg.seed}
    export_pipeline(pipe, cfg.out, info)
    log(f"exported {cfg.out} at unet step {state.steps.get('unet', 0)}")


if __name__ == "__main__":
    main()
