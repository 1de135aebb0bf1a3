"""Captioners built on transformers (BLIP, Florence-2), loaded like base models.

A hub id is read from the local Hugging Face cache when HF_HUB_OFFLINE=1 and fetched otherwise;
a local folder is read as it is. Every way loading fails ends in one ModelLoadError that names
the model and says how to get it. Weights go to the GPU in float16 when there is one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from sdlora.errors import ModelLoadError
from sdlora.models.hub import looks_like_path, not_in_cache, offline
from sdlora.models.loading import _LOADING

# CLIP reads 77 tokens of a caption; words generated past that never reach training.
MAX_NEW_TOKENS = 75
LOCAL_HINT = "give a local folder of it (--captioner-model)"


class TransformersCaptioner:
    """A vision-to-text model and its processor: a batch of images in, one caption each out."""

    def __init__(self, name: str, model, processor, task_prompt: str = "") -> None:
        self.name, self.model, self.processor, self.task_prompt = name, model, processor, task_prompt

    def caption(self, images: list[Image.Image]) -> list[str]:
        """One caption per image, in order, generated as a batch."""
        if not images:
            return []
        text = {"text": [self.task_prompt] * len(images)} if self.task_prompt else {}
        inputs = self.processor(images=images, return_tensors="pt", **text)
        inputs = {
            key: value.to(self.model.device, self.model.dtype if value.is_floating_point() else value.dtype)
            for key, value in inputs.items()
        }
        with torch.inference_mode():
            ids = self.model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS)
        return [" ".join(text.split()) for text in self.processor.batch_decode(ids, skip_special_tokens=True)]


def load_transformers_captioner(spec, source: str, device: str | None = None) -> TransformersCaptioner:
    """The spec's model and processor from `source` (hub id or local folder), on `device` (default: GPU if any)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    what = f"captioner {spec.name} model"
    path = Path(source).expanduser()
    if path.is_dir():
        _check_folder(spec, path, what)
        location, local_only = str(path), True
    elif looks_like_path(source):
        raise ModelLoadError(f"{what} {source} is not a folder on this machine")
    else:
        location, local_only = source, offline()
    import transformers
    from huggingface_hub.errors import HFValidationError

    model_class = getattr(transformers, spec.model_class)
    try:
        with _LOADING:  # transformers builds on the meta device too; one load at a time, as for base models
            model = model_class.from_pretrained(location, dtype=dtype, local_files_only=local_only)
            processor = transformers.AutoProcessor.from_pretrained(location, local_files_only=local_only)
    except HFValidationError:
        raise ModelLoadError(f"{what} {source!r} is neither a local folder nor a valid hub id") from None
    except (OSError, ValueError) as exc:
        if not path.is_dir() and offline():
            raise not_in_cache(what, source, LOCAL_HINT) from None
        raise ModelLoadError(f"{what} {source} could not be loaded: {_first_line(exc)}") from None
    return TransformersCaptioner(spec.name, model.to(device).eval(), processor, spec.task_prompt)


def _check_folder(spec, path: Path, what: str) -> None:
    """Refuse a folder that is not a saved model of this captioner's kind, naming what it is instead."""
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type", "")
    except (OSError, json.JSONDecodeError):
        raise ModelLoadError(
            f"{what} folder {path} has no readable config.json (save it with save_pretrained)"
        ) from None
    if model_type != spec.model_type:
        raise ModelLoadError(
            f"{what} folder {path} holds a {model_type or 'unknown'} model, not {spec.model_type}"
        )


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
