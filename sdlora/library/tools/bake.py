"""Bake: a mix of adapters merged into the base model's weights and saved as a full model.

The base is loaded afresh (the generator's resident base is shared and stays untouched), each
adapter goes in through diffusers' LoRA loaders, is weighted and fused by diffusers' `set_adapters`
and `fuse_lora` in float32, and its LoRA layers are unloaded. The result is saved as a diffusers
folder, or as one `.safetensors` file in the original checkpoint layout that AUTOMATIC1111, Forge
and ComfyUI load (SD 1.x, 2.x, SDXL; SD3.5 and Flux.1 in their transformers' own layouts, see
models/transformer_layout.py), optionally in float16 or bfloat16, with what was baked named in its
metadata (the folder: in `baked.json`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from sdlora.errors import AdapterFormatError, ConfigError, SdloraError
from sdlora.library.formats.adapter import Adapter, ModelLayout
from sdlora.library.formats.files import file_size

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SINGLE_FILE = ".safetensors"
PREDICTIONS = {"epsilon": "epsilon", "v_prediction": "v"}  # ours -> modelspec's
RECORD = "baked.json"  # a baked folder's record of what went into it
Progress = Callable[[int, int, str], None]  # (stages done, stages in all, the stage now under way)


@dataclass(frozen=True)
class BakeReport:
    """What was baked where: the base, each adapter and its weight, the layers changed, the size."""

    out: Path
    base_model: str
    family: str
    mix: tuple[tuple[str, float], ...]
    layers: int
    dtype: str
    size_bytes: int

    @property
    def layout(self) -> str:
        return "single file, original layout" if self.out.suffix == SINGLE_FILE else "diffusers folder"

    def lines(self) -> list[str]:
        """The adapters and weights, then the file, for the CLI and the app."""
        out = [f"{name} at weight {weight:g}" for name, weight in self.mix]
        out.append(
            f"baked into {self.base_model} ({self.family}): {self.layers} layers changed; "
            f"{self.out} ({self.layout}, {self.dtype}, {file_size(self.size_bytes)})"
        )
        return out


def bake(
    base_model: str,
    weighted: list[tuple[Adapter, float]],
    out: Path,
    dtype: str | None = None,
    names: list[str] | None = None,
    overwrite: bool = False,
    on_progress: Progress | None = None,
) -> BakeReport:
    """Save `base_model` with the weighted adapters fused in at `out` (a folder, or a .safetensors file);
    `on_progress` hears (stages done, stages in all, the stage now under way) from 0 to the end."""
    from sdlora.models.loading import inspect_pipeline, load_pipeline

    out = Path(out)
    names = names or [
        a.metadata.get("modelspec.title") or f"adapter {i + 1}" for i, (a, _) in enumerate(weighted)
    ]
    check_request(weighted, out, dtype, names, overwrite)
    stages = len(weighted) + 2  # the base loaded, each adapter fused, the model saved
    tell = on_progress or (lambda done, total, stage: None)
    tell(0, stages, f"loading the base model {base_model}")
    pipeline = load_pipeline(base_model)
    info = inspect_pipeline(pipeline)
    if out.suffix == SINGLE_FILE:  # before the work: a family or a mix its single file cannot hold
        from sdlora.models.original_layout import check_family

        check_family(info.family, {key.split(".", 1)[0] for adapter, _ in weighted for key in adapter.layers})
    layers = fuse_mix(pipeline, weighted, names, ModelLayout.of(pipeline, info.family), tell)
    pipeline.to(DTYPES[dtype or "fp32"])
    mix = tuple(zip(names, (float(w) for _, w in weighted), strict=True))
    save = save_single_file if out.suffix == SINGLE_FILE else save_folder
    tell(stages - 1, stages, f"saving {out}")
    save(pipeline, info.family, out, baked_record(base_model, info, out, mix), overwrite)
    size = (
        out.stat().st_size if out.is_file() else sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    )
    tell(stages, stages, f"saved {out}")
    return BakeReport(out, base_model, info.family, mix, layers, dtype or "fp32", size)


def baked_record(base_model: str, info, out: Path, mix: tuple[tuple[str, float], ...]) -> dict[str, str]:
    """What was baked into what, as the single file's header or the folder's baked.json says it."""
    record = {
        "sdlora.baked": json.dumps([[n, w] for n, w in mix]),
        "sdlora.base_model": base_model,
        "sdlora.family": info.family,
        "modelspec.title": out.stem if out.suffix == SINGLE_FILE else out.name,
    }
    if info.prediction_type in PREDICTIONS:  # modelspec names no value for flow matching (SD3.5, Flux.1)
        record["modelspec.prediction_type"] = PREDICTIONS[info.prediction_type]
    return record


def check_request(
    weighted: list[tuple[Adapter, float]], out: Path, dtype: str | None, names: list[str], overwrite: bool
) -> None:
    """Refuse in one line: no adapters, an unknown precision, a weight that is not a number, an existing out."""
    if not weighted:
        raise ConfigError("bake: name at least one adapter to bake in")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"bake: precision {dtype!r} is not one of {', '.join(DTYPES)}")
    for name, (_, weight) in zip(names, weighted, strict=True):
        if not isinstance(weight, int | float) or weight != weight or abs(weight) == float("inf"):
            raise ConfigError(f"bake: the weight of {name} must be a number, not {weight!r}")
    if out.exists() and not overwrite:
        raise SdloraError(f"{out} already exists; choose another path (nothing was overwritten)")
    if out.suffix != SINGLE_FILE and out.suffix:
        raise ConfigError(f"bake: {out} must be a folder or end in {SINGLE_FILE}")


def fuse_mix(
    pipeline,
    weighted: list[tuple[Adapter, float]],
    names: list[str],
    layout: ModelLayout,
    on_progress: Progress | None = None,
) -> int:
    """Fuse the weighted adapters into the pipeline's weights, one after another; how many layers changed.

    Each is fused and its LoRA layers dropped before the next comes in: the weights end as the sum
    fusing them together gives (peft adds one adapter's ΔW at a time either way), and memory holds
    one adapter's layers, not the whole mix's."""
    from sdlora.library.formats.pipeline import load_into_pipeline

    for name, (adapter, _) in zip(names, weighted, strict=True):  # all checked before any is fused
        wrong = next((key for key in adapter.layers if key not in layout.shapes), None)
        if wrong is not None:
            raise AdapterFormatError(
                f"{name} does not fit this {layout.family} base model: it has no layer {wrong}"
            )
    changed = set()
    for i, ((adapter, weight), name) in enumerate(zip(weighted, names, strict=True), start=1):
        if on_progress is not None:
            on_progress(i, len(weighted) + 2, f"fusing {name} at weight {float(weight):g}")
        load_into_pipeline(pipeline, adapter, f"bake_{i}")
        pipeline.set_adapters([f"bake_{i}"], [float(weight)])
        pipeline.fuse_lora(adapter_names=[f"bake_{i}"], lora_scale=1.0)
        pipeline.unload_lora_weights()  # after fusing, this keeps the fused weights and drops peft's layers
        changed.update(adapter.layers)
    return len(changed)


def save_folder(pipeline, family: str, out: Path, record: dict[str, str], overwrite: bool) -> None:
    """A diffusers folder (`save_pretrained`) with `baked.json`, moved into place whole."""
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipeline.save_pretrained(scratch)
        (scratch / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        if overwrite and out.exists():
            shutil.rmtree(out)
        scratch.rename(out)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def save_single_file(pipeline, family: str, out: Path, record: dict[str, str], overwrite: bool) -> None:
    """One .safetensors file in the original layout, with the record and the architecture in its header."""
    from sdlora.library.formats.files import save_tensors
    from sdlora.models.families import family_named
    from sdlora.models.original_layout import original_state_dict

    tensors = {k: v.contiguous() for k, v in original_state_dict(pipeline, family).items()}
    denoiser = getattr(pipeline, family_named(family).denoiser)
    architecture = family_named(family).architecture_of(dict(denoiser.config)).removesuffix("/lora")
    header = {**record, "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": architecture}
    save_tensors(out, tensors, header)


def run_from_cli(library, args, base_model: str, on_progress: Progress | None = None) -> BakeReport:
    """`adapters bake`: library adapters at their weights, baked into --base-model (the demo model if none)."""
    weighted = [(_with_block_weights(library, name, lbw), weight) for name, weight, lbw in args.adapters]
    names = [f"{name}:lbw={lbw}" if lbw else name for name, _, lbw in args.adapters]
    return bake(base_model, weighted, Path(args.out), args.dtype, names=names, on_progress=on_progress)


def _with_block_weights(library, name: str, block_weights: str) -> Adapter:
    """Library adapter `name`, each block scaled by `block_weights` (a preset or a list; none: as it is)."""
    from sdlora.library.formats.write import family_of
    from sdlora.library.tools.block_weights import apply_block_weights, parse_block_weights

    adapter = library.read(name)
    if not block_weights:
        return adapter
    family = library.reference.family if library.reference is not None else family_of(adapter)
    return apply_block_weights(adapter, parse_block_weights(block_weights, family))


def parse_mix(text: str) -> list[tuple[str, float]]:
    """'star:0.8, stripes:0.5' (or one a line; a name alone is weight 1) -> [(name, weight)], or one-line refusal."""
    mix = []
    for item in text.replace("\n", ",").split(","):
        item = item.strip()
        if not item:
            continue
        name, _, weight = item.rpartition(":") if ":" in item else (item, "", "1")
        try:
            mix.append((name.strip(), float(weight)))
        except ValueError:
            raise ConfigError(f"bake: {item!r} is not NAME or NAME:WEIGHT") from None
    if not mix:
        raise ConfigError("bake: name at least one adapter to bake in, as NAME:WEIGHT")
    return mix
