"""Widget values <-> config fields, by name: the tabs key their widgets by the field each one shows.

TrainConfig's leaf names are unique across its sections (rank lives in lora, trigger_word in
data), so a widget named `rank` and an API parameter named `rank` both mean `lora.rank`.
No gradio here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sdlora.config import SECTIONS, TrainConfig, field_help


def train_field_sections() -> dict[str, str]:
    """Each TrainConfig leaf name -> its section ('' for the top level, 'data', 'lora')."""
    out = {name: "" for name in field_help(TrainConfig) if name not in SECTIONS}
    for section, cls in SECTIONS.items():
        out.update({name: section for name in field_help(cls)})
    return out


def train_defaults() -> dict[str, Any]:
    """Every TrainConfig leaf name with its default."""
    flat = {name: info["default"] for name, info in field_help(TrainConfig).items() if name not in SECTIONS}
    for cls in SECTIONS.values():
        flat.update({name: info["default"] for name, info in field_help(cls).items()})
    return flat


def nested(flat: dict[str, Any]) -> dict[str, Any]:
    """Leaf names -> the nested settings TrainConfig.from_dict reads; an unknown name is kept (and refused there)."""
    sections = train_field_sections()
    out: dict[str, Any] = {}
    for name, value in flat.items():
        section = sections.get(name, "")
        (out.setdefault(section, {}) if section else out)[name] = value
    return out


def flat(settings: dict[str, Any]) -> dict[str, Any]:
    """Nested settings (a preset, a config file) -> leaf names."""
    out: dict[str, Any] = {}
    for name, value in settings.items():
        if name in SECTIONS and isinstance(value, dict):
            out.update(value)
        else:
            out[name] = value
    return out


def as_field_types(values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """Widget values in their fields' types: a slider's 20.0 is the int 20, a text is stripped, a list a tuple."""
    out = {}
    for name, value in values.items():
        default = defaults.get(name, dataclasses.MISSING)
        if isinstance(value, str):
            value = value.strip()
        if isinstance(default, bool) or value is None:
            pass
        elif isinstance(default, int) and isinstance(value, float) and value.is_integer():
            value = int(value)
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        out[name] = value
    return out
