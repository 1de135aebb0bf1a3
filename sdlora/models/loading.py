"""Load a Stable Diffusion base model from a hub id, a diffusers folder or a single file.

Every way this can fail (offline, missing, not Stable Diffusion, damaged file) ends in
one ModelLoadError that names the model and says what to do.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from sdlora import runtime
from sdlora.errors import ModelLoadError
from sdlora.models.families import (
    FAMILIES,
    Family,
    family_named,
    family_of,
    family_of_pipeline,
    pipeline_classes,
)
from sdlora.models.families.unet import cross_attention_width
from sdlora.models.hub import looks_like_path, not_in_cache, offline

SINGLE_FILE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SUPPORTED_PIPELINES = pipeline_classes()
# diffusers builds models under accelerate's empty-weights context, which patches torch for the whole
# process: two loads at once (the app's warm-up beside a training run) left one with meta tensors.
_LOADING = threading.Lock()


@dataclass(frozen=True)
class ModelInfo:
    """What kind of Stable Diffusion a base model is, read from its own config."""

    family: str  # the family's stored name (sdlora.models.families)
    prediction_type: str  # "epsilon" or "v_prediction"
    resolution: int  # native training resolution in pixels
    cross_attention_dim: int

    @property
    def model_family(self) -> Family:
        """Everything that differs between families: ids, conditioning, objective."""
        return family_named(self.family)

    @property
    def kohya_version(self) -> str:
        """The value kohya writes in ss_base_model_version."""
        return self.model_family.kohya_version


def load_pipeline(source: str, torch_dtype: torch.dtype = torch.float32):
    """A diffusers pipeline for `source` with the safety checker left out; one load at a time."""
    with _LOADING:
        runtime.quiet_loading_bars()  # one line per job on a console, not a bar per model part
        return _load_pipeline(str(source).strip(), torch_dtype)


def _load_pipeline(source: str, torch_dtype: torch.dtype):
    source = str(source).strip()
    if not source:
        raise ModelLoadError("no base model given: pass a hub id, a diffusers folder or a .safetensors file")
    path = Path(source).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelLoadError(
            f"{source}: pickled checkpoints ({path.suffix}) can run code when loaded and are "
            "refused; convert it to .safetensors or use a diffusers folder"
        )
    if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        from sdlora.models.single_file import load_single_file_pipeline

        return load_single_file_pipeline(path, torch_dtype)
    if path.is_dir():
        return _load_folder(path, torch_dtype)
    if looks_like_path(source):
        raise ModelLoadError(f"base model {source} is not a diffusers folder or a .safetensors file")
    return _load_hub(source, torch_dtype)


def _load_folder(path: Path, torch_dtype: torch.dtype):
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(
            f"{path} is not a diffusers model folder (no model_index.json); "
            "for a single-file checkpoint pass the .safetensors file itself"
        )
    try:
        class_name = json.loads(index.read_text()).get("_class_name", "")
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{index} cannot be read: {exc}") from None
    return _from_pretrained(str(path), class_name, torch_dtype, local_only=True)


def _load_hub(repo_id: str, torch_dtype: torch.dtype):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HFValidationError

    try:
        index = hf_hub_download(repo_id, "model_index.json", local_files_only=offline())
        class_name = json.loads(Path(index).read_text()).get("_class_name", "")
    except HFValidationError:
        raise ModelLoadError(
            f"{repo_id!r} is neither an existing folder or file nor a valid hub id"
        ) from None
    except Exception as exc:  # noqa: BLE001 - hub errors come in many classes; all mean "not available"
        if offline():
            raise not_in_cache(
                "base model", repo_id, "pass a local diffusers folder or .safetensors file"
            ) from None
        raise ModelLoadError(f"base model {repo_id} could not be fetched from the hub: {exc}") from None
    return _from_pretrained(repo_id, class_name, torch_dtype, local_only=offline())


def _from_pretrained(source: str, class_name: str, torch_dtype: torch.dtype, local_only: bool):
    import diffusers

    if class_name not in SUPPORTED_PIPELINES:
        words = [f.words for f in reversed(FAMILIES)]
        raise ModelLoadError(
            f"{source} is a {class_name or 'unknown'} model, not one sdlora can train "
            f"({', '.join(words[:-1])} or {words[-1]})"
        )
    pipeline_class = getattr(diffusers, class_name)
    extra = next(f.load_options for f in FAMILIES if class_name in f.pipeline_classes)
    try:
        return pipeline_class.from_pretrained(source, dtype=torch_dtype, local_files_only=local_only, **extra)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"base model {source} could not be loaded: {exc}") from None


def inspect_pipeline(pipeline) -> ModelInfo:
    """Family, prediction type and native resolution from the pipeline's own configs."""
    family = family_of_pipeline(pipeline)
    prediction_type = (
        getattr(pipeline.scheduler.config, "prediction_type", None) or family.prediction_type or "epsilon"
    )
    denoiser = dict(getattr(pipeline, family.denoiser).config)
    resolution = family.native_resolution(denoiser, dict(pipeline.vae.config))
    return ModelInfo(family.name, prediction_type, resolution, cross_attention_width(denoiser) or 0)


def family_and_resolution(denoiser_config: dict, vae_config: dict) -> tuple[str, int, int]:
    """(family, native resolution in pixels, text conditioning width) from the denoiser's and VAE's
    configs, whether they come from a loaded model or straight from its JSON files."""
    family = family_of(denoiser_config)
    resolution = family.native_resolution(denoiser_config, vae_config)
    return family.name, resolution, cross_attention_width(denoiser_config) or 0
