"""Adapter files: every common LoRA file in, and files every tool loads out.

One reader turns any file into one in-memory form (`Adapter`: per layer down, up, alpha, keyed
by model part and module path), and one writer per output format writes it again. Nothing
outside this package knows a key name.

    names.py     how each tool spells a layer (kohya, original-SD/LDM, diffusers, PEFT)
    adapter.py   the in-memory form and the layout of the model it must fit
    read.py      any file -> Adapter, or a one-line refusal naming the file
    lycoris.py   LoHa, LoKr and Tucker LoCon as exact LoRA layers
    write.py     Adapter -> kohya (the library's own format) or diffusers/PEFT
    pipeline.py  Adapter -> a loaded diffusers pipeline
    files.py     safetensors checks, atomic writes, metadata
    metadata.py  the header of an adapter trained here
"""

from __future__ import annotations

import importlib

from sdlora.library.formats.names import FORMATS, TOOLS

# Public names and the module that holds each. They load on first use, so that the web app's
# first page (which only needs FORMATS and TOOLS) does not wait for torch.
_HOMES = {
    "Adapter": "adapter",
    "LoraLayer": "adapter",
    "ModelLayout": "adapter",
    "layer_shapes": "adapter",
    "atomic_write": "files",
    "atomic_write_text": "files",
    "check_header": "files",
    "header_metadata": "files",
    "read_metadata": "files",
    "save_tensors": "files",
    "training_metadata": "metadata",
    "load_into_pipeline": "pipeline",
    "read_adapter": "read",
    "family_of": "write",
    "write_adapter": "write",
}
__all__ = ["FORMATS", "TOOLS", *_HOMES]


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'sdlora.library.formats' has no attribute {name!r}")
    return getattr(importlib.import_module(f"sdlora.library.formats.{_HOMES[name]}"), name)
