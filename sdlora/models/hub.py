"""The Hugging Face hub rules shared by base models and captioners: offline, path or hub id, how to fetch.

Imports nothing heavy, so the Settings tab can say what is missing before torch is loaded.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from sdlora.errors import ModelLoadError


def offline() -> bool:
    """True when HF_HUB_OFFLINE forbids downloads: hub models then come from the local cache only."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


# A hub id is exactly "owner/name": letters, digits, '-', '_' and '.', each part starting and ending
# with a letter or digit, no '--' or '..', at most 96 characters (the hub's own limits).
HUB_ID = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?/[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")
FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def is_hub_id(source: str) -> bool:
    """True for an "owner/name" hub id; a name that exists here, or whose owner is a local folder, is a path."""
    if len(source) > 96 or not HUB_ID.fullmatch(source) or "--" in source or ".." in source:
        return False
    if source.lower().endswith(FILE_SUFFIXES):
        return False  # "models/sd15.safetensors": a file that is missing, not a hub repository
    owner = source.split("/")[0]
    return not (Path(source).exists() or Path(owner).is_dir())


def looks_like_path(source: str) -> bool:
    """True when `source` names a file or folder (existing or not) rather than an "owner/name" hub id."""
    return not is_hub_id(source.strip())


def fetch_command(repo_id: str) -> str:
    """The command that puts a hub model into the local cache, run once on a machine with internet."""
    return f"huggingface-cli download {repo_id}"


def not_in_cache(what: str, repo_id: str, local_hint: str) -> ModelLoadError:
    """The one error for a hub model missing from the local cache while HF_HUB_OFFLINE=1 forbids fetching it."""
    return ModelLoadError(
        f"{what} {repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids "
        f"downloading it; download it once online ({fetch_command(repo_id)}), or {local_hint}"
    )
