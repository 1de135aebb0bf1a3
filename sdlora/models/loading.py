"""Load a Stable Diffusion base model from a hub id, a diffusers folder or a single file.

Every way this can fail (offline, missing, not Stable Diffusion, damaged file) ends in
one ModelLoadError that names the model and says what to do.
"""

from __future__ import annotations

import importlib.util
import json
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from sdlora import runtime
from sdlora.errors import ConfigError, ModelLoadError
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


def load_pipeline(source: str, torch_dtype: torch.dtype = torch.float32, quantize_base: str = "none"):
    """A diffusers pipeline for `source` with the safety checker left out; one load at a time.

    `quantize_base` int8 or nf4 loads the denoiser's weights quantized by bitsandbytes (through
    diffusers' BitsAndBytesConfig) computing in bf16, the text encoders in bf16, the VAE in `torch_dtype`.
    """
    with _LOADING:
        runtime.quiet_loading_bars()  # one line per job on a console, not a bar per model part
        return _load_pipeline(str(source).strip(), torch_dtype, quantize_base)


def _load_pipeline(source: str, torch_dtype: torch.dtype, quantize_base: str = "none"):
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
        if quantize_base != "none":
            raise ConfigError(
                f"quantize_base={quantize_base} loads diffusers folders and hub ids, not single files "
                f"like {path.name}; use quantize_base=none or the model's diffusers folder"
            )
        from sdlora.models.single_file import load_single_file_pipeline

        return load_single_file_pipeline(path, torch_dtype)
    if path.is_dir():
        return _load_folder(path, torch_dtype, quantize_base)
    if looks_like_path(source):
        raise ModelLoadError(f"base model {source} is not a diffusers folder or a .safetensors file")
    return _load_hub(source, torch_dtype, quantize_base)


def _load_folder(path: Path, torch_dtype: torch.dtype, quantize_base: str):
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
    return _from_pretrained(str(path), class_name, torch_dtype, local_only=True, quantize_base=quantize_base)


def _load_hub(repo_id: str, torch_dtype: torch.dtype, quantize_base: str):
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
    return _from_pretrained(
        repo_id, class_name, torch_dtype, local_only=offline(), quantize_base=quantize_base
    )


def _from_pretrained(
    source: str, class_name: str, torch_dtype: torch.dtype, local_only: bool, quantize_base: str = "none"
):
    import diffusers

    if class_name not in SUPPORTED_PIPELINES:
        words = [f.words for f in reversed(FAMILIES)]
        raise ModelLoadError(
            f"{source} is a {class_name or 'unknown'} model, not one sdlora can train "
            f"({', '.join(words[:-1])} or {words[-1]})"
        )
    pipeline_class = getattr(diffusers, class_name)
    family = next(f for f in FAMILIES if class_name in f.pipeline_classes)
    extra = {**family.load_options, "dtype": torch_dtype}
    if quantize_base != "none":
        extra.update(quantized_denoiser(quantize_base, family.denoiser, torch_dtype))
    try:
        return pipeline_class.from_pretrained(source, local_files_only=local_only, **extra)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"base model {source} could not be loaded: {exc}") from None
    except (RuntimeError, ImportError) as exc:
        # diffusers' bitsandbytes quantizer: "No GPU found..." without CUDA, an ImportError without the
        # package; any other error (out of memory on a GPU) keeps its own message.
        gpu = torch.cuda.is_available()
        if quantize_base == "none" or (isinstance(exc, RuntimeError) and gpu):
            raise
        raise ConfigError(_quantize_refusal(quantize_base, gpu=gpu)) from None


# diffusers' QLoRA recipe for Flux: int8, or NF4 computing in bf16; the LoRA over it trains in fp32.
QUANTIZED_COMPUTE_DTYPE = torch.bfloat16


def quantized_denoiser(kind: str, denoiser: str, torch_dtype: torch.dtype) -> dict:
    """from_pretrained arguments that load the pipeline's `denoiser` through diffusers' BitsAndBytesConfig
    (int8 or nf4) with bf16 for its unquantized layers and the text encoders; the VAE keeps `torch_dtype`."""
    from diffusers import BitsAndBytesConfig, PipelineQuantizationConfig

    if kind == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    elif kind == "nf4":
        config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=QUANTIZED_COMPUTE_DTYPE
        )
    else:
        raise ConfigError(f"quantize_base must be none, int8 or nf4, got {kind!r}")
    # The text encoders in bf16 too: they sit on the GPU beside the quantized denoiser while the captions
    # are cached (T5-XXL is 19 GB in float32); the VAE keeps `torch_dtype` (it encodes in float32).
    dtypes = {denoiser: QUANTIZED_COMPUTE_DTYPE, "vae": torch_dtype, "default": QUANTIZED_COMPUTE_DTYPE}
    return {
        "quantization_config": PipelineQuantizationConfig(quant_mapping={denoiser: config}),
        "dtype": dtypes,
    }


def check_quantize_base(kind: str) -> None:
    """Refuse a quantized base before minutes go into loading where it cannot run: bitsandbytes through
    diffusers needs a CUDA GPU with bf16, and the package itself."""
    if kind == "none":
        return
    if not torch.cuda.is_available():
        raise ConfigError(_quantize_refusal(kind, gpu=False))
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(_quantize_refusal(kind, gpu=True))
    if not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"quantize_base={kind} computes in bf16, which this GPU lacks; use quantize_base=none"
        )


def _quantize_refusal(kind: str, gpu: bool) -> str:
    """The one line that says what a quantized base is missing here, and what to do."""
    if not gpu:
        return (
            f"quantize_base={kind} needs a CUDA GPU (bitsandbytes via diffusers); "
            "use quantize_base=none on this machine"
        )
    return (
        f"quantize_base={kind} needs the bitsandbytes package: pip install 'bitsandbytes>=0.50.2'; "
        "or use quantize_base=none"
    )


def is_quantized(model) -> bool:
    """Whether a model's frozen weights were loaded quantized (they then keep their dtype and device)."""
    return bool(getattr(model, "is_quantized", False))


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
