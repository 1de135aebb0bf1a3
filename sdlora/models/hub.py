"""The Hugging Face hub rules shared by base models and captioners: offline, path or hub id, how to fetch.

Imports nothing heavy, so the Settings tab can say what is missing before torch is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path

from sdlora.errors import ModelLoadError


def offline() -> bool:
    """True when HF_HUB_OFFLINE forbids downloads: hub models then come from the local cache only."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def looks_like_path(source: str) -> bool:
    """True when `source` names a file or folder rather than an "org/name" hub id."""
    return Path(source).expanduser().exists() or source.startswith((".", "/", "~")) or source.count("/") > 1


def fetch_command(repo_id: str) -> str:
    """The command that puts a hub model into the local cache, run once on a machine with internet."""
    return f"huggingface-cli download {repo_id}"


def not_in_cache(what: str, repo_id: str, local_hint: str) -> ModelLoadError:
    """The one error for a hub model missing from the local cache while HF_HUB_OFFLINE=1 forbids fetching it."""
    return ModelLoadError(
        f"{what} {repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids "
        f"downloading it; download it once online ({fetch_command(repo_id)}), or {local_hint}"
    )
