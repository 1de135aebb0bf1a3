"""A model's weights for extract: from a diffusers folder one tensor at a time, or from a loaded pipeline.

A diffusers folder (or a hub model's folder in the local cache) is read lazily: each part is built
on the meta device from its config, which names its layers and shapes without allocating them, and
each weight is read from the part's safetensors files only when asked for. Anything else (a single
file) is loaded whole through sdlora.models.loading.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch

from sdlora.errors import ModelLoadError
from sdlora.models.hub import looks_like_path

PARTS = ("unet", "transformer", "text_encoder", "text_encoder_2")


class LoadedWeights:
    """The weights of a loaded pipeline."""

    def __init__(self, source: str) -> None:
        from sdlora.models.loading import inspect_pipeline, load_pipeline

        self.source = source
        self.pipeline = load_pipeline(source)
        self.family = inspect_pipeline(self.pipeline).family
        self.parts = {
            p: getattr(self.pipeline, p) for p in PARTS if getattr(self.pipeline, p, None) is not None
        }

    def weight(self, part: str, path: str) -> torch.Tensor:
        """A layer's weight by library path (transformers 5 flattens CLIPTextModel: no `text_model.`)."""
        try:
            return self.parts[part].get_submodule(path).weight.detach()
        except AttributeError:
            return self.parts[part].get_submodule(path.removeprefix("text_model.")).weight.detach()


class FolderWeights:
    """A diffusers folder's weights, read one tensor at a time through safetensors."""

    def __init__(self, source: str, folder: Path) -> None:
        from sdlora.models.loading import family_and_resolution

        self.source, self.folder = source, folder
        index = json.loads((folder / "model_index.json").read_text())
        self.parts = {p: _meta_model(folder / p, index[p]) for p in PARTS if _present(index.get(p))}
        denoiser = "unet" if "unet" in self.parts else "transformer"
        vae = json.loads((folder / "vae" / "config.json").read_text())
        self.family = family_and_resolution(dict(self.parts[denoiser].config), vae)[0]
        self._files = {p: _tensor_files(folder / p) for p in self.parts}

    def weight(self, part: str, path: str) -> torch.Tensor:
        from safetensors import safe_open

        for key in (f"{path}.weight", f"{path.removeprefix('text_model.')}.weight"):
            file = self._files[part].get(key)
            if file is not None:
                with safe_open(str(file), framework="pt") as opened:
                    return opened.get_tensor(key)
        raise ModelLoadError(f"{self.source}: {part} has no weight {path}.weight; the folder is incomplete")


def model_weights(source: str) -> LoadedWeights | FolderWeights:
    """The lazy reader for a diffusers folder or a cached hub model, else the model loaded whole."""
    folder = _local_folder(source.strip())
    if folder is not None:
        return FolderWeights(source, folder)
    return LoadedWeights(source)


def layout_pipeline(weights: LoadedWeights | FolderWeights) -> SimpleNamespace:
    """Something ModelLayout.of reads as a pipeline: the parts, on the meta device or loaded."""
    return SimpleNamespace(**{p: weights.parts.get(p) for p in PARTS})


def _present(entry) -> bool:
    return isinstance(entry, list) and entry[0] is not None


def _local_folder(source: str) -> Path | None:
    if looks_like_path(source):
        path = Path(source).expanduser()
        return path if (path / "model_index.json").is_file() else None
    from huggingface_hub import snapshot_download

    try:  # a hub id read from the local cache only; anything else loads the usual way (and says why not)
        path = Path(snapshot_download(source, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, or not a model repo: the loader gives the message
        return None
    return path if (path / "model_index.json").is_file() else None


def _meta_model(folder: Path, entry: list) -> torch.nn.Module:
    """The part built from its config on the meta device: names and shapes, no weights."""
    import importlib

    from accelerate import init_empty_weights

    library, class_name = entry
    model_class = getattr(importlib.import_module(library), class_name)
    with init_empty_weights():
        if library == "transformers":
            from transformers import AutoConfig

            return model_class(AutoConfig.from_pretrained(folder))
        return model_class.from_config(model_class.load_config(folder))


def _tensor_files(folder: Path) -> dict[str, Path]:
    """Which safetensors file holds each key; the full-precision files when a variant (fp16) sits beside them."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    plain = [f for f in files if len(f.name.split(".")) == 2]
    where = {}
    for file in plain or files:
        with safe_open(str(file), framework="pt") as opened:
            where.update(dict.fromkeys(opened.keys(), file))
    if not where:
        raise ModelLoadError(f"{folder} has no .safetensors weights (pickled .bin files are not read)")
    return where
