"""The web app served in-process for tests: a free port, one server per `with`, closed afterwards.

The app tests (test_app*, test_batching, test_browser, progress_streams, test_queue) import these
from here rather than from one another; conftest's `tiny_app` and `demo_app` are the servers they share.
"""

from __future__ import annotations

import contextlib
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "assets" / "demo-model"
CONCEPTS = REPO / "assets" / "concepts"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(studio, **launch) -> Iterator[SimpleNamespace]:
    """The app over `studio` on a free port, closed afterwards; yields its url, studio and root folder."""
    sys.path.insert(0, str(REPO))  # app.py sits beside sdlora/, outside the installed package
    import app

    demo = app.launch(studio, port=free_port(), prevent_thread_lock=True, **launch)
    try:
        yield SimpleNamespace(url=demo.local_url, studio=studio, root=Path(studio.adapters_dir).parent)
    finally:
        demo.close()


@contextlib.contextmanager
def serving_model(
    base_model: str, root: Path, concepts: Path = CONCEPTS, **launch
) -> Iterator[SimpleNamespace]:
    """A fresh Studio over `base_model` with its adapters and work folders under `root`, served."""
    from sdlora.ui.studio import Studio

    studio = Studio(base_model, root / "adapters", concepts, work_dir=root / "work")
    with serving(studio, **launch) as served:
        yield served
