"""Command line: `python -m sdlora train ...`, also under `accelerate launch`.

The train flags are generated from the config dataclasses, so help texts and defaults
have one source. Precedence: dataclass defaults < --config file < flags on the line.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Any

from sdlora.config import DataConfig, LoraSpec, TrainConfig, field_help, read_config_file
from sdlora.errors import SdloraError

SECTIONS = {"data": DataConfig, "lora": LoraSpec}


def _flag(name: str, info: dict[str, Any]) -> str:
    return info.get("flag") or "--" + name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field; every default is None so only what the user typed overrides."""
    for section, cls in (("", TrainConfig), *SECTIONS.items()):
        group = parser.add_argument_group(section or "training")
        for name, info in field_help(cls).items():
            if name in SECTIONS:
                continue
            default = info["default"]
            kwargs: dict[str, Any] = {"dest": f"{section}.{name}" if section else name, "default": None,
                                      "help": f"{info['help']} (default: {default!r})"}
            if isinstance(default, bool):
                kwargs["action"] = argparse.BooleanOptionalAction
            elif isinstance(default, tuple):
                kwargs.update(nargs="*", type=type(default[0]) if default else str, metavar=name.upper())
            elif info.get("choices"):
                kwargs.update(type=type(default), choices=info["choices"])
            else:
                kwargs.update(type=type(default), metavar=name.upper())
            group.add_argument(_flag(name, info), **kwargs)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Merge a --config file with the flags that were given on the command line."""
    values: dict[str, Any] = read_config_file(args.config) if args.config else {}
    for dest, value in vars(args).items():
        if value is None or dest in ("config", "resume", "command", "quiet", "preset"):
            continue
        section, _, name = dest.rpartition(".")
        target = values.setdefault(section, {}) if section else values
        target[name] = tuple(value) if isinstance(value, list) else value
    return TrainConfig.from_dict(values, source=args.config or "command line")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sdlora", description="Train and use Stable Diffusion LoRAs.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a LoRA adapter from a folder of concept images",
                                description="Train a LoRA on the UNet attention projections. Runs unchanged "
                                            "under `accelerate launch` on several GPUs.")
    train.add_argument("--config", help="JSON or TOML file of settings (as saved beside every adapter)")
    train.add_argument("--resume", metavar="CKPT", help="checkpoint folder to continue from, or 'latest'")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_flags(train)
    return parser


def quiet_library_progress_bars() -> None:
    """Loading bars of diffusers and transformers would interleave with the training bar."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def run_train(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from sdlora.events import StopFlag
    from sdlora.progress import ConsoleProgress
    from sdlora.train import cpu_only, train

    quiet_library_progress_bars()
    config = config_from_args(args)
    is_main = PartialState(cpu=cpu_only()).is_main_process
    progress = ConsoleProgress(enabled=is_main and not args.quiet)
    stop = StopFlag()

    def first_ctrl_c_stops_cleanly(signum, frame):
        if stop.requested:
            raise KeyboardInterrupt
        stop.request()
        if is_main:
            print("\nstopping after this step and saving (Ctrl-C again to abort without saving)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, first_ctrl_c_stops_cleanly)
    try:
        result = train(config, on_event=progress, stop=stop, resume=args.resume)
    finally:
        signal.signal(signal.SIGINT, previous)
        progress.close()
    if is_main:
        state = "stopped early at" if result.stopped_early else "finished"
        print(f"{state} step {result.steps}: adapter {result.adapter_path}, config {result.config_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    # transformers warns at import about optional image backends a trainer never uses.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            return run_train(args)
    except SdloraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 1

