"""What the web server hands to clients as files, and what it removes when it is told to stop.

gradio copies every file a handler returns (a generated image, a preview, an export) into its
own cache and serves it from there, so no folder of ours needs to be served as a whole. A folder
named in `allowed_paths` is served whole, to any client that guesses a path under it: only folders
that gradio would otherwise refuse to copy from (outside the working folder and the system temp
folder) are named, and the library's own folders (the training queue with every job's settings and
images, run checkpoints, exports) are blocked even then.
"""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path

from sdlora.jobs.queue import QUEUE_FOLDER
from sdlora.ui.studio import Studio

PRIVATE_LIBRARY_FOLDERS = (QUEUE_FOLDER, ".runs", ".exports")


def allowed_paths(studio: Studio) -> list[str]:
    """Folders whose files handlers return and gradio would not copy on its own: outside cwd and temp."""
    ordinary = (Path.cwd().resolve(), Path(tempfile.gettempdir()).resolve())
    folders = (studio.adapters_dir, studio.concepts_dir, studio.work_dir)
    return [str(f) for f in folders if not any(Path(f).resolve().is_relative_to(o) for o in ordinary)]


def blocked_paths(studio: Studio) -> list[str]:
    """Folders no client may read, even under an allowed folder: the queue, checkpoints, exports."""
    return [str(studio.adapters_dir / name) for name in PRIVATE_LIBRARY_FOLDERS]


def remove_work_folder_on_sigterm(studio: Studio) -> None:
    """On SIGTERM, remove the studio's own work folder first, then end the way SIGTERM ends a process.

    Exit handlers do not run when a signal kills Python, so without this every `kill` of the
    server (systemd, docker stop) left an sdlora-app-* folder of uploads and images behind.
    """

    def on_sigterm(signum: int, frame) -> None:
        if studio.remove_work_dir is not None:
            studio.remove_work_dir()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, on_sigterm)


def client_of(request) -> str:
    """Who sent a request, for the per-client caps: the signed-in user, else the address; '' when unknown."""
    if request is None:
        return ""
    if getattr(request, "username", None):
        return f"user {request.username}"
    client = getattr(request, "client", None)
    return f"address {client.host}" if client is not None and client.host else ""
