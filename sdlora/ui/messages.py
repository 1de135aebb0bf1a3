"""Errors a user can cause become a readable message in the page, never a stack trace."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable

import gradio as gr

from sdlora.errors import SdloraError

log = logging.getLogger("sdlora.app")


def readable_errors(fn: Callable) -> Callable:
    """Turn SdloraError into gr.Error with its message; works for plain and generator handlers."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def stream(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except SdloraError as exc:
                raise _shown(exc) from None

        return stream

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SdloraError as exc:
            raise _shown(exc) from None

    return call


def _shown(exc: SdloraError) -> gr.Error:
    log.info("%s: %s", type(exc).__name__, exc)
    return gr.Error(str(exc), print_exception=False)
