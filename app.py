"""sdlora's web app: train a LoRA, generate with adapters, manage the library.

    python app.py [--host 127.0.0.1] [--port 7860] [--share] [--auth USER:PASS | --no-auth]
                  [--base-model assets/demo-model] [--adapters-dir ./adapters] [--allowed-roots DIR ...]

A shared server (--share, or a --host other than this machine) needs --auth, or --no-auth said
out loud; its base model is fixed by --base-model, since one resident model serves every user.

The tabs live in sdlora/ui/; every handler calls one method of sdlora.ui.studio.Studio,
and every event has an api_name, so gradio_client scripts drive the same API as the page
(`Client(url).view_api()` lists them: /upload_images, /train, /progress, /stop, /generate,
/list_adapters, /import_adapter, /export_adapter, /rename_adapter, /delete_adapter, ...).
torch and diffusers load in the background after the page is served.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
from pathlib import Path

from sdlora import runtime

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
runtime.prepare()  # threads and console, as for `python -m sdlora`; before gradio pulls anything in

import gradio as gr  # noqa: E402

from sdlora.assets import DEMO_MODEL, EXAMPLE_CONCEPTS  # noqa: E402
from sdlora.config import TrainConfig  # noqa: E402
from sdlora.ui import generate_tab, library_tab, serving, settings_tab, train_tab  # noqa: E402
from sdlora.ui.access import Access  # noqa: E402
from sdlora.ui.studio import Studio  # noqa: E402

DEFAULT_BASE_MODEL = str(DEMO_MODEL)  # the same defaults as `python -m sdlora train` and `generate`
DEFAULT_ADAPTERS_DIR = TrainConfig.output_dir
DEFAULT_CONCEPTS_DIR = str(EXAMPLE_CONCEPTS)
MAX_UPLOAD = "1gb"
# gradio's queue runs at most `max_threads` jobs at once, async ones included, and every open page
# holds one: its progress stream. At gradio's 40, forty open pages stalled Stop and generation. The
# streams are async (no thread each); threads stay bounded by the handlers' concurrency limits.
MAX_JOBS = 1000
# Demo-model images are 64 px: show them enlarged with crisp pixels rather than as stamps.
CSS = """
#thumbnails img, #previews img, #results img, #adapter-preview img, #comparison img { image-rendering: pixelated; }
#adapter-preview img, #comparison img { width: 100%; height: 100%; object-fit: contain; }
"""


def build_app(studio: Studio) -> gr.Blocks:
    """The whole page: four tabs, plus the events that cross tabs (a finished run fills the library)."""
    with gr.Blocks(title="sdlora", analytics_enabled=False) as demo:
        gr.Markdown("## sdlora: train and use LoRA adapters for Stable Diffusion and Flux.1")
        with gr.Tab("Train"):
            train = train_tab.build(studio)
        with gr.Tab("Generate"):
            generate = generate_tab.build(studio)
        with gr.Tab("Library") as library_page:
            library = library_tab.build(studio)
        with gr.Tab("Settings") as settings_page:
            settings = settings_tab.build(studio)

        def adapter_choices(table):
            names = list(table["name"]) if table is not None and len(table) else []
            return [gr.Dropdown(choices=names) for _ in generate.adapter_pickers]

        # Whatever changes the library table (training, import, rename, delete) updates the pickers too.
        library.table.change(
            adapter_choices, library.table, generate.adapter_pickers, api_name="adapter_choices"
        )
        refresh_adapters, adapter_views = library.refresh, [library.table, library.problems]
        demo.load(refresh_adapters, None, adapter_views, api_name="refresh_adapters")
        train.finished.then(refresh_adapters, None, adapter_views, api_name="refresh_after_training")
        library_page.select(refresh_adapters, None, adapter_views, api_name="refresh_library")
        settings_page.select(settings.show, None, settings.status, api_name="settings_on_open")
        # A run lives on the server: a (re)loaded page streams the current run's progress again.
        generate.on_page_load(demo)  # steps, guidance and sampler as the loaded model draws best
        train.on_page_load(demo).then(
            refresh_adapters, None, adapter_views, api_name="refresh_after_progress"
        )
    return demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="sdlora web app")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all interfaces)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    parser.add_argument("--auth", metavar="USER:PASS", help="ask for this user name and password")
    parser.add_argument(
        "--no-auth",
        action="store_true",
        help="serve a shared server (--share or a non-local --host) without a password anyway",
    )
    parser.add_argument(
        "--base-model",
        default=DEFAULT_BASE_MODEL,
        help="hub id, diffusers folder or .safetensors file (default: %(default)s)",
    )
    parser.add_argument(
        "--adapters-dir", default=DEFAULT_ADAPTERS_DIR, help="the adapter library (default: %(default)s)"
    )
    parser.add_argument("--concepts-dir", default=DEFAULT_CONCEPTS_DIR, help="example concept folders")
    parser.add_argument(
        "--allowed-roots",
        nargs="+",
        metavar="DIR",
        help="more folders a page or script may name on this server (regularisation images, "
        "concept folders, a base model), besides the concepts dir, the repo's assets/ "
        "and the work folder of uploads and images",
    )
    args = parser.parse_args(argv)
    if args.auth and ":" not in args.auth:
        parser.error("--auth takes USER:PASS")
    if args.auth and args.no_auth:
        parser.error("--auth and --no-auth contradict each other; give one")
    if is_shared(args.host, args.share) and not (args.auth or args.no_auth):
        where = (
            "a public gradio.live link (--share)" if args.share else f"every network that reaches {args.host}"
        )
        parser.error(
            f"this would serve the app to {where}, where anyone could train, generate and delete "
            "adapters on this machine: pass --auth USER:PASS, or --no-auth to serve it open anyway"
        )
    return args


def is_shared(host: str, share: bool) -> bool:
    """True when people other than this machine's user can reach the server."""
    if share:
        return True
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return True


def access_for(args: argparse.Namespace) -> Access:
    """What clients may name and do, from the flags: a shared server keeps its base model."""
    roots = tuple(Path(r) for r in args.allowed_roots or ())
    return Access(roots=roots, model_switch=not is_shared(args.host, args.share))


def launch(
    studio: Studio,
    host: str = "127.0.0.1",
    port: int | None = None,
    share: bool = False,
    auth: tuple[str, str] | None = None,
    prevent_thread_lock: bool = False,
) -> gr.Blocks:
    """Build, queue and serve the app; loading the base model starts once the page is up."""
    demo = build_app(studio)
    demo.queue(default_concurrency_limit=1)
    demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        auth=auth,
        prevent_thread_lock=True,
        max_threads=MAX_JOBS,
        allowed_paths=serving.allowed_paths(studio),
        blocked_paths=serving.blocked_paths(studio),
        max_file_size=MAX_UPLOAD,
        show_error=False,
        quiet=True,
        css=CSS,
    )
    print(f"sdlora is running on {demo.local_url}", flush=True)
    studio.warm_up()
    studio.start_queue()  # jobs queued before a restart (or by `python -m sdlora queue add`) run now
    if not prevent_thread_lock:
        demo.block_thread()
    return demo


def log_to_console() -> None:
    """One line per request and per job under the address line; from libraries only their warnings."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("sdlora").setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    log_to_console()
    studio = Studio(args.base_model, args.adapters_dir, args.concepts_dir, access=access_for(args))
    serving.remove_work_folder_on_sigterm(studio)
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    launch(studio, args.host, args.port, args.share, auth)


if __name__ == "__main__":
    main()
