"""One run of the demo build: its knobs, its clock and stop flag, its log line and its image batches.

Every stage module takes these from here, so none of them imports the build's entry point.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sdlora.assets import DEMO_MODEL
from sdlora.demo.shapes import render


@dataclass(frozen=True)
class BuildConfig:
    """Knobs of the demo build; the defaults are the recipe the shipped model used."""

    seed: int = 0  # every image, initial weight and noise draw derives from it
    out: Path = DEMO_MODEL  # exported fp16 diffusers folder
    work: Path = Path("build/demo")  # full checkpoint, latent cache, log
    vae_steps: tuple[int, int] = (700, 1500)  # steps of stage vae1 and vae2
    vae_lr: tuple[float, float] = (1e-3, 2e-4)
    # KL weight per latent value, relative to one pixel's squared error. A weight on the KL summed
    # over the latent (unnormalised) made the KL dominate and capped reconstructions near 18 dB.
    vae_kl: tuple[float, float] = (1e-3, 1e-4)  # stage two trades latent regularity for colour fidelity
    vae_batch: int = 16  # many small steps beat few large ones for this autoencoder
    # Stage "decoder": with the encoder frozen the latent space stays put, so this stage can
    # sharpen colours and edges even after the UNet is trained (round trips of the example
    # concepts, before -> after: magenta 73% -> 100%, checks 0% -> 100%; docs/demo-model.md).
    decoder_steps: int = 1000
    decoder_lr: float = 2e-4
    cache_images: int = 20000  # base images encoded once for the UNet stage
    unet_steps: int = 40000  # upper bound; the time budget usually ends a run first
    unet_lr: float = 3e-4
    unet_warmup: int = 200
    unet_batch: int = 32
    empty_caption: float = 0.1  # share of empty prompts, so classifier-free guidance works
    short_caption: float = 0.45  # share of 'a red circle' prompts; the rest are long
    ema_decay: float = 0.999
    checkpoint_minutes: float = 5.0
    export_minutes: float = 10.0
    budget_minutes: float | None = None  # stop cleanly after this much wall time
    eval_per_pair: int = 2  # images per colour x shape pair scored at each export (0: skip)
    measure_images: int = (
        512  # images encoded to set the latent scale; the first 64 also score the VAE's PSNR
    )
    doc: Path = Path("docs/demo-model.md")  # where stage figures are appended
    threads: int = 2


class Run:
    """One invocation of the build: clock, stop flag and periodic saving."""

    def __init__(self, cfg: BuildConfig) -> None:
        self.cfg = cfg
        self.started = time.monotonic()
        self.stop_requested = False
        self.last_checkpoint = self.last_export = time.monotonic()
        self.previous_handlers = {
            sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGINT, signal.SIGTERM)
        }

    def close(self) -> None:
        """Give the signals back to whoever handled them before (matters when called from tests)."""
        for sig, handler in self.previous_handlers.items():
            signal.signal(sig, handler)

    def _request_stop(self, signum: int, frame: object) -> None:
        log(f"signal {signum}: stopping after this step")
        self.stop_requested = True

    def out_of_time(self) -> bool:
        """True once a stop was asked for or the budget is spent."""
        budget = self.cfg.budget_minutes
        return self.stop_requested or (budget is not None and time.monotonic() - self.started > budget * 60)

    def due(self, attr: str, minutes: float) -> bool:
        """True every `minutes`, tracked in the timestamp attribute `attr`."""
        if time.monotonic() - getattr(self, attr) < minutes * 60:
            return False
        setattr(self, attr, time.monotonic())
        return True


def log(message: str) -> None:
    """Timestamped line on stdout (redirected to build/demo/log.txt by the caller)."""
    print(time.strftime("%H:%M:%S"), message, flush=True)


def images_tensor(scenes: list) -> torch.Tensor:
    """Render scenes into a [-1, 1] NCHW batch."""
    arrays = np.stack([np.asarray(render(s), dtype=np.float32) for s in scenes])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2) / 127.5 - 1
