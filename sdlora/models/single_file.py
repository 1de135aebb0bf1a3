"""Load a single-file Stable Diffusion checkpoint (.safetensors) from local files only.

diffusers' from_single_file would download the original model's configs from the hub;
we ship those small JSON files in sdlora/models/configs and pass them in. Checkpoints
carry no tokenizer vocabulary, so it comes from a local folder or the Hugging Face
cache. The file is only ever read through safetensors, never unpickled.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sdlora.errors import ModelLoadError
from sdlora.models.families import Family, family_named, family_of_single_file

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline, SchedulerMixin
    from transformers import CLIPTokenizer

log = logging.getLogger(__name__)

CONFIG_ROOT = Path(__file__).parent / "configs"
TOKENIZER_ENV = "SDLORA_TOKENIZER_DIR"
# Every Stable Diffusion version tokenizes with the same CLIP BPE vocabulary, so a cached
# download of any of these (repo id, subfolder) will do.
CACHED_TOKENIZERS = (
    ("openai/clip-vit-large-patch14", ""),
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer"),
    ("runwayml/stable-diffusion-v1-5", "tokenizer"),
    ("stabilityai/stable-diffusion-2-1", "tokenizer"),
    ("stabilityai/stable-diffusion-2-1-base", "tokenizer"),
    ("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer"),
)
TOKENIZER_HELP = (
    "single-file checkpoints do not contain the CLIP tokenizer's vocabulary (vocab.json and merges.txt, "
    "about 1.5 MB) and it cannot be downloaded offline. Download it once while online with "
    "`hf download openai/clip-vit-large-patch14 vocab.json merges.txt` (sdlora then finds it in the "
    f"Hugging Face cache), or put both files in a folder and set {TOKENIZER_ENV} to that folder"
)

# diffusers' names for the Stable Diffusion variants we recognise but cannot train on.
REFUSED = {
    "inpainting": "an SD 1.x inpainting model",
    "inpainting_v2": "an SD 2.x inpainting model",
    "xl_inpaint": "an SDXL inpainting model",
    "xl_refiner": "the SDXL refiner",
    "upscale": "the SD x4 upscaler",
    "playground-v2-5": "a Playground v2.5 model",
    "instruct-pix2pix": "an InstructPix2Pix model",
}
SD2_PROBE = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"


@dataclass(frozen=True)
class CheckpointInfo:
    """What a single-file checkpoint holds, read from its header."""

    family: str  # the family's stored name (sdlora.models.families)
    prediction_type: str  # "epsilon" or "v_prediction"

    @property
    def architecture(self) -> str:
        """The config folder under models/configs, named like Stability's ModelSpec architecture ids."""
        return family_named(self.family).config_folder(self.prediction_type)


def load_single_file_pipeline(
    path: Path, torch_dtype: torch.dtype, tokenizer_dir: Path | None = None
) -> DiffusionPipeline:
    """A diffusers pipeline from a Stable Diffusion .safetensors file, built without the network."""
    import diffusers
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    path = Path(path).expanduser()
    info = inspect_checkpoint(path)
    family = family_named(info.family)
    if family.denoiser == "transformer":  # SD3.5, Flux.1: the rest comes from a diffusers folder
        from sdlora.models.transformer_single_file import load_transformer_file

        return load_transformer_file(path, family, torch_dtype)
    folder = CONFIG_ROOT / info.architecture
    parts = load_tokenizers(folder, find_tokenizer_folder(path, tokenizer_dir))
    parts["scheduler"] = _scheduler(folder, info.prediction_type)
    pipeline_class = getattr(diffusers, _read_json(folder / "model_index.json")["_class_name"])
    if pipeline_class is diffusers.StableDiffusionPipeline:
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    log.info("loading %s as %s (%s)", path, info.architecture, info.prediction_type)
    try:
        pipeline = pipeline_class.from_single_file(
            str(path), config=str(folder), local_files_only=True, torch_dtype=torch_dtype, **parts
        )
    except (OSError, ValueError, KeyError, IndexError, RuntimeError, SingleFileComponentError) as exc:
        raise ModelLoadError(
            f"{path} looks like {info.architecture} but its weights are incomplete or do not "
            f"fit that architecture ({exc}); use the full original checkpoint or a diffusers "
            "folder"
        ) from None
    _check_complete(pipeline, path)
    return pipeline


def inspect_checkpoint(path: Path) -> CheckpointInfo:
    """Which Stable Diffusion a .safetensors file holds, from its header; refuses anything else."""
    shapes, metadata = _read_header(path)
    family = _family(path, shapes)
    for part, prefixes in family.single_file_parts.items():
        if not any(key.startswith(prefixes) for key in shapes):
            raise ModelLoadError(
                f"{path} has no {part} weights; sdlora needs a complete checkpoint (UNet, VAE "
                "and text encoder): use the full model file or a diffusers folder"
            )
    return CheckpointInfo(family.name, _prediction_type(path, family, shapes, metadata))


def _read_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Tensor shapes and metadata from the safetensors header, without loading any weights."""
    from safetensors import SafetensorError, safe_open

    # diffusers picks its reader by the exact suffix and reads anything else with pickle.
    if path.suffix != ".safetensors":
        raise ModelLoadError(f"{path}: rename the file to end in lowercase .safetensors")
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file; check the path to the base model")
    try:
        with safe_open(str(path), framework="pt") as file:
            shapes = {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}
            metadata = file.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(
            f"{path} is not a readable .safetensors file ({exc}); it may be incomplete or "
            "damaged: download it again"
        ) from None
    return shapes, metadata


def _family(path: Path, shapes: dict[str, tuple[int, ...]]) -> Family:
    """The family: SD3.5 and Flux.1 by their families' marker keys, the UNet families by diffusers' own
    key-based detection; anything else is refused."""
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES, infer_diffusers_model_type

    from sdlora.models.transformer_single_file import transformer_family_of_keys

    transformer = transformer_family_of_keys(set(shapes))
    if transformer is not None:
        return transformer

    # Shape-only stand-ins: diffusers' detection looks at key names and shapes, never values.
    stand_ins = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    try:
        kind = infer_diffusers_model_type(stand_ins)
    except (KeyError, IndexError, ValueError, RuntimeError):
        kind = "unknown"
    family = family_of_single_file(kind)
    # "v1" is also diffusers' answer for anything it does not recognise, so confirm it.
    if family is not None and (kind != "v1" or CHECKPOINT_KEY_NAMES["v1"] in shapes):
        return family
    if kind in REFUSED:
        what = REFUSED[kind]
    elif any("lora" in key.lower() for key in shapes):
        raise ModelLoadError(
            f"{path} is a LoRA adapter, not a base model: choose a Stable Diffusion "
            "checkpoint as the base model and import this file as an adapter"
        )
    else:
        what = "not a Stable Diffusion model" if kind in ("v1", "unknown") else f"a {kind} model"
    raise ModelLoadError(
        f"{path} is {what}; sdlora trains on Stable Diffusion 1.x, 2.x, SDXL, SD3.5 and Flux.1 base "
        "checkpoints: choose one of those"
    )


def _prediction_type(
    path: Path, family: Family, shapes: dict[str, tuple[int, ...]], metadata: dict[str, str]
) -> str:
    """epsilon or v_prediction: declared metadata first, then marker keys, then (SD 2.x only) the weights."""
    declared = metadata.get("modelspec.prediction_type", "").strip().lower()
    if declared in ("v", "v_prediction", "v-prediction"):
        return "v_prediction"
    if declared in ("epsilon", "eps"):
        return "epsilon"
    architecture = metadata.get("modelspec.architecture", "")
    if architecture.startswith("stable-diffusion-v2-768-v"):
        return "v_prediction"
    if architecture.startswith("stable-diffusion-v2-512"):
        return "epsilon"
    if "v_pred" in shapes:  # marker key that merging tools add to v-prediction models
        return "v_prediction"
    if not family.prediction_from_weights():
        return family.prediction_type or "epsilon"  # "flow" for SD3.5 and Flux.1
    if SD2_PROBE not in shapes:
        return "v_prediction"  # SD 2.0-v and 2.1, the common 2.x models, are v-prediction
    return "v_prediction" if _sd2_probe_spread(path) > 0.09 else "epsilon"


def _sd2_probe_spread(path: Path) -> float:
    """Spread of one small bias in the UNet's last transformer block.

    SD 2.x files do not record their training objective. Community loaders (ComfyUI) tell
    them apart by this bias: v-prediction models end up with a much wider spread than
    epsilon ones (2.0-base, 2.1-base and their fine-tunes).
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        return float(file.get_tensor(SD2_PROBE).float().std(unbiased=False))


def find_tokenizer_folder(model: Path, explicit: Path | None = None) -> Path:
    """A local folder holding the CLIP vocabulary: the given one, $SDLORA_TOKENIZER_DIR, or the HF cache."""
    chosen = explicit or os.environ.get(TOKENIZER_ENV, "").strip()
    if chosen:
        folder = Path(chosen).expanduser()
        for candidate in (folder, folder / "tokenizer"):  # a diffusers model folder works too
            if _has_vocabulary(candidate):
                return candidate
        raise ModelLoadError(
            f"cannot load {model}: tokenizer folder {folder} has no vocab.json and merges.txt; "
            + TOKENIZER_HELP
        )
    from huggingface_hub import try_to_load_from_cache

    for repo_id, subfolder in CACHED_TOKENIZERS:
        found = try_to_load_from_cache(repo_id, f"{subfolder}/vocab.json".lstrip("/"))
        if isinstance(found, str) and _has_vocabulary(Path(found).parent):
            return Path(found).parent
    raise ModelLoadError(f"cannot load {model}: " + TOKENIZER_HELP)


def _has_vocabulary(folder: Path) -> bool:
    return (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()


def load_tokenizers(config_folder: Path, vocabulary: Path) -> dict[str, CLIPTokenizer]:
    """The pipeline's tokenizer(s): the shared vocabulary with each model's own settings (pad token differs)."""
    from transformers import CLIPTokenizer

    tokenizers = {}
    for name in ("tokenizer", "tokenizer_2"):
        settings_file = config_folder / name / "tokenizer_config.json"
        if not settings_file.is_file():
            continue
        settings = {k: v for k, v in _read_json(settings_file).items() if k != "tokenizer_class"}
        try:
            tokenizers[name] = CLIPTokenizer.from_pretrained(
                str(vocabulary), local_files_only=True, **settings
            )
        except (OSError, ValueError) as exc:
            raise ModelLoadError(
                f"the tokenizer files in {vocabulary} cannot be read ({exc}); " + TOKENIZER_HELP
            ) from None
    return tokenizers


def _scheduler(config_folder: Path, prediction_type: str) -> SchedulerMixin:
    import diffusers

    config = _read_json(config_folder / "scheduler" / "scheduler_config.json")
    return getattr(diffusers, config["_class_name"]).from_config(config, prediction_type=prediction_type)


def _check_complete(pipeline: DiffusionPipeline, path: Path) -> None:
    """Refuse a pipeline with weights left unloaded or a tokenizer bigger than its text encoder."""
    # diffusers leaves parameters it found no weights for on the meta device instead of failing.
    for name, part in pipeline.components.items():
        if isinstance(part, torch.nn.Module) and any(p.is_meta for p in part.parameters()):
            raise ModelLoadError(
                f"{path} is missing some {name} weights; the file is incomplete or from an "
                "unsupported variant: use the full original checkpoint or a diffusers folder"
            )
    for suffix in ("", "_2"):
        tokenizer, encoder = (
            pipeline.components.get("tokenizer" + suffix),
            pipeline.components.get("text_encoder" + suffix),
        )
        if tokenizer is not None and encoder is not None and len(tokenizer) > encoder.config.vocab_size:
            raise ModelLoadError(
                f"the tokenizer found for {path} has {len(tokenizer)} tokens but the text encoder "
                f"only {encoder.config.vocab_size}; point {TOKENIZER_ENV} at a CLIP tokenizer"
            )


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())
