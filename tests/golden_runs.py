"""Short seeded training runs whose LoRA tensors are pinned in tests/golden/, bit for bit.

The golden files were made by running this script on the code before the model families got
their own home (commit 12aede2, before sdlora/models/families existed):

    PYTHONPATH=$PWD:$PWD/tests OMP_NUM_THREADS=1 python tests/golden_runs.py

tests/test_families.py trains the same runs on the current code and compares. Rerun the script
only for a change that is meant to change what training learns, and say so in the commit.
Each file records the CPU kernels and torch version that made it: float results are bit-exact
only on the same kind of CPU (AVX2 and AVX-512 kernels round differently) and torch build.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

from sdlora.config import DataConfig, LoraSpec, TrainConfig

GOLDEN = Path(__file__).parent / "golden"
DEMO_MODEL = Path(__file__).resolve().parents[1] / "assets" / "demo-model"
# run name -> which model it trains on; the settings of each are in `run_config`.
RUNS = {
    "sd1-epsilon-regularised": "tiny-epsilon",
    "sd1-v-prediction-min-snr": "tiny-v",
    "sdxl-regularised": "tiny-sdxl",
    "demo": "demo",
}


def draw_images(folder: Path, count: int, colour: tuple[int, int, int], caption: str) -> Path:
    """`count` small images of a disc, each a little further right, the first with a caption file."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = Image.new("RGB", (48, 40), "white")
        ImageDraw.Draw(image).ellipse([4 + 3 * i, 4, 30 + 3 * i, 30], fill=colour)
        image.save(folder / f"img{i}.png")
    (folder / "img0.txt").write_text(caption)
    return folder


def run_config(run: str, model: Path, work: Path) -> TrainConfig:
    """The settings of one pinned run: each exercises a different path of the loop."""
    concepts = draw_images(work / "concept", 4, (220, 30, 30), "a red circle")
    regularisation = draw_images(work / "reg", 3, (40, 70, 220), "a blue circle")
    config = TrainConfig(
        base_model=str(model),
        output_dir=str(work / "out"),
        name=run,
        steps=3,
        learning_rate=1e-3,
        seed=7,
        cpu_threads=1,
        data=DataConfig(images=str(concepts), trigger_word="sks", resolution=32),
        lora=LoraSpec(rank=4, alpha=16.0),
    )
    if run == "sd1-epsilon-regularised":  # prior preservation, flips, accumulation, noise offset, Min-SNR
        return replace(
            config,
            batch_size=2,
            gradient_accumulation_steps=2,
            noise_offset=0.05,
            min_snr_gamma=5.0,
            prior_loss_weight=0.5,
            data=replace(config.data, flip=True, regularization_images=str(regularisation)),
        )
    if run == "sd1-v-prediction-min-snr":
        return replace(config, min_snr_gamma=5.0, lr_schedule="cosine", warmup_steps=1)
    if run == "sdxl-regularised":
        return replace(
            config,
            batch_size=2,
            data=replace(config.data, regularization_images=str(regularisation)),
        )
    return replace(  # the demo model at its native 64 px with the demo preset's layers
        config,
        steps=2,
        data=replace(config.data, resolution=64),
        lora=replace(config.lora, extra_target_modules=("proj_in", "proj_out", "ff.net.2", "conv1", "conv2")),
    )


def train_run(run: str, model: Path, work: Path) -> dict[str, torch.Tensor]:
    """The tensors of the adapter file one pinned run saves."""
    from sdlora.training.loop import train

    result = train(run_config(run, model, work))
    return load_file(str(result.adapter_path))


def build_models(folder: Path) -> dict[str, Path]:
    """The models the runs train on: the tiny test models (seed 0, as conftest builds them) and the demo."""
    from tiny_models import save_tiny_model, save_tiny_sdxl_model

    return {
        "tiny-epsilon": save_tiny_model(folder / "tiny-eps", "epsilon"),
        "tiny-v": save_tiny_model(folder / "tiny-v", "v_prediction"),
        "tiny-sdxl": save_tiny_sdxl_model(folder / "tiny-sdxl"),
        "demo": DEMO_MODEL,
    }


def made_on() -> dict[str, str]:
    """What float results depend on besides the code: the CPU kernels torch picks, and torch itself."""
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}


def main() -> None:
    torch.set_num_threads(1)
    GOLDEN.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        models = build_models(Path(tmp) / "models")
        for run, model in RUNS.items():
            tensors = train_run(run, models[model], Path(tmp) / run)
            save_file(tensors, str(GOLDEN / f"{run}.safetensors"), metadata=made_on())
            print(run, len(tensors), "tensors", file=sys.stderr)


if __name__ == "__main__":
    main()
