"""SD3.5 and Flux.1 single files: the transformer from the file, everything else from a diffusers folder.

People download BFL's transformer-only Flux.1 files (`flux1-dev.safetensors`) and Stability's SD3.5
all-in-one files (`sd3.5_large.safetensors`). Neither holds tokenizers, and the Flux file holds no VAE
or text encoders, so the rest comes from a diffusers folder of the same model: the folder the file lies
in (both repos ship the file beside their diffusers folders), else $SDLORA_PARTS_DIR. diffusers'
`from_single_file` converts the transformer's original names, with the folder's transformer config.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdlora.errors import ModelLoadError
from sdlora.models.families import FAMILIES, Family

if TYPE_CHECKING:
    import torch

PARTS_ENV = "SDLORA_PARTS_DIR"
ORIGINAL_PREFIX = "model.diffusion_model."  # how all-in-one files prefix the denoiser's keys
PARTS = ("vae", "text_encoder", "tokenizer", "scheduler")  # what a parts folder must hold besides configs


def transformer_family_of_keys(keys: set[str]) -> Family | None:
    """The transformer family whose original-layout marker key the header holds, if any."""
    for family in FAMILIES:
        marker = getattr(family, "single_file_key", "")
        if marker and (marker in keys or ORIGINAL_PREFIX + marker in keys):
            return family
    return None


def parts_folder(path: Path, family: Family) -> Path:
    """The diffusers folder the file's other parts come from, or a one-line refusal naming what is missing."""
    candidates = [path.parent]
    if os.environ.get(PARTS_ENV, "").strip():
        candidates.insert(0, Path(os.environ[PARTS_ENV].strip()).expanduser())
    for folder in candidates:
        index = folder / "model_index.json"
        if index.is_file() and _pipeline_class(index) in family.pipeline_classes:
            missing = [part for part in PARTS if not (folder / part).is_dir()]
            if missing:
                raise ModelLoadError(
                    f"{path} holds the {family.words} transformer, but the diffusers folder {folder} for its "
                    f"other parts has no {', '.join(missing)}: use the model's complete diffusers folder"
                )
            return folder
    raise ModelLoadError(
        f"{path} holds only the {family.words} transformer: its VAE, text encoders and tokenizers come from "
        f"the model's diffusers folder, which was not found beside the file; put the file in that folder "
        f"or set {PARTS_ENV} to it"
    )


def load_transformer_file(path: Path, family: Family, torch_dtype: torch.dtype) -> Any:
    """The pipeline of the parts folder with the transformer read from the single file."""
    import diffusers
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    folder = parts_folder(path, family)
    pipeline_class = getattr(diffusers, _pipeline_class(folder / "model_index.json"))
    config = json.loads((folder / family.denoiser / "config.json").read_text())
    model_class = getattr(diffusers, config["_class_name"])
    try:
        denoiser = model_class.from_single_file(
            str(path),
            config=str(folder),
            subfolder=family.denoiser,
            local_files_only=True,
            torch_dtype=torch_dtype,
        )
        return pipeline_class.from_pretrained(
            str(folder), **{family.denoiser: denoiser}, dtype=torch_dtype, local_files_only=True
        )
    except (OSError, ValueError, KeyError, IndexError, RuntimeError, SingleFileComponentError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"{path} looks like a {family.words} transformer but does not fit the transformer config in "
            f"{folder} ({first_line[:200]}); use the diffusers folder of the same model"
        ) from None


def _pipeline_class(index: Path) -> str:
    try:
        return str(json.loads(index.read_text()).get("_class_name", ""))
    except (OSError, ValueError):
        return ""
