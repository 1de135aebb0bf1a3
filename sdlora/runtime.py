"""How every entry point starts: CPU threads that yield to other work, and a console a person can read.

`prepare()` runs first in `app.py`, `python -m sdlora` (also under `accelerate launch` and
torchrun) and the bench scripts, before torch is imported: OpenMP reads its environment once,
when its runtime starts, so a setting made later does nothing. Nothing here imports torch.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

# Idle OpenMP threads sleep instead of spinning. With spinning threads, two jobs on a shared CPU (the
# app beside a training run, a browser, another user) starve each other: measured on a busy 2-core
# CPU, the first demo-model image took 31 s instead of 0.6 s, and 12 demo-preset CLI training steps
# beside a busy process had not finished in 900 s while the sleeping-thread CLI and app took about
# 5 s a step (docs/benchmarks.md, `bench/train_speed.py --entry-points`).
THREAD_SETTINGS = {"OMP_WAIT_POLICY": "PASSIVE"}
# Library chatter that tells a user nothing they can act on. transformers warns at import about
# optional image backends a trainer never uses.
QUIET_SETTINGS = {"TRANSFORMERS_VERBOSITY": "error"}

# diffusers' `from_pipe` (every preview, every adapter mix) casts each model with `.to(dtype=...)`,
# and ModelMixin.to then warns that "these modules should be kept in float32" even when the list
# is empty. An empty list says nothing; a non-empty one still prints.
EMPTY_FP32_LIST = re.compile(r"should be kept in float32: \[\]")
DIFFUSERS_MODELS_LOGGER = "diffusers.models.modeling_utils"
# peft warns on every adapter added beside another; a mix of adapters is what generation is for.
PEFT_SECOND_ADAPTER = r"Already found a `peft_config` attribute in the model"


class _DropMessages(logging.Filter):
    """Drops log records whose message matches a pattern; everything else passes."""

    def __init__(self, pattern: re.Pattern[str]) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def prepare() -> None:
    """Set the thread and console settings every entry point shares; call it before importing torch.

    Settings already in the environment win, so a user's OMP_WAIT_POLICY=ACTIVE is kept.
    """
    for name, value in {**THREAD_SETTINGS, **QUIET_SETTINGS}.items():
        os.environ.setdefault(name, value)
    quiet_library_warnings()


def quiet_library_warnings() -> None:
    """Filter, at their source, the library warnings that say nothing to a user (idempotent)."""
    warnings.filterwarnings("ignore", message=PEFT_SECOND_ADAPTER, category=UserWarning)
    logger = logging.getLogger(DIFFUSERS_MODELS_LOGGER)  # the same object diffusers logs through later
    if not any(isinstance(f, _DropMessages) for f in logger.filters):
        logger.addFilter(_DropMessages(EMPTY_FP32_LIST))


def quiet_loading_bars() -> None:
    """No diffusers/transformers loading bars (they interleave with the training bar and fill a
    server's console); a download from the hub keeps its bar. Imports diffusers: call it where a
    model is about to load anyway."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    downloads_quiet = are_progress_bars_disabled()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()  # this one silences the hub's bars as well
    if not downloads_quiet:
        enable_progress_bars()
