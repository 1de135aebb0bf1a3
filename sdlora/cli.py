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
    return config_and_defaults(args)[0]


def config_and_defaults(args: argparse.Namespace) -> tuple[TrainConfig, str]:
    """The config, and the line that says which model defaults filled what the user did not give."""
    values: dict[str, Any] = read_config_file(args.config) if args.config else {}
    for dest, value in vars(args).items():
        if value is None or dest in ("config", "resume", "command", "quiet", "overwrite"):
            continue
        section, _, name = dest.rpartition(".")
        target = values.setdefault(section, {}) if section else values
        target[name] = tuple(value) if isinstance(value, list) else value
    label = _fill_model_defaults(values)
    return TrainConfig.from_dict(values, source=args.config or "command line"), label


def _fill_model_defaults(values: dict[str, Any]) -> str:
    """Settings the user did not give come from what the base model is (the demo preset on the demo model)."""
    from sdlora.presets import model_defaults

    label, settings = model_defaults(str(values.get("base_model", "")))
    for key, value in settings.items():
        if isinstance(value, dict):
            section = values.setdefault(key, {})
            for name, setting in value.items():
                section.setdefault(name, setting)
        else:
            values.setdefault(key, value)
    return label


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sdlora", description="Train and use Stable Diffusion LoRAs.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a LoRA adapter from a folder of concept images",
                                description="Train a LoRA on the UNet attention projections. Runs unchanged "
                                            "under `accelerate launch` on several GPUs.")
    train.add_argument("--config", help="JSON or TOML file of settings (as saved beside every adapter)")
    train.add_argument("--resume", metavar="CKPT", help="checkpoint folder to continue from, or 'latest'")
    train.add_argument("--overwrite", action="store_true",
                       help="start over although this --name already has an adapter or checkpoints in --output")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_flags(train)
    _add_generate_parser(commands)
    _add_adapters_parser(commands)
    _add_queue_parser(commands)
    return parser


def _weighted(text: str) -> tuple[str, float]:
    name, _, weight = text.rpartition(":") if ":" in text else (text, "", "1")
    try:
        return name, float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lora {text!r}: expected NAME or NAME:WEIGHT") from None


def _add_generate_parser(commands) -> None:
    from sdlora.config import SCHEDULERS

    gen = commands.add_parser("generate", help="generate images with a mix of library adapters")
    gen.add_argument("--base-model", required=True, help="hub id, diffusers folder or .safetensors file")
    gen.add_argument("--adapters-dir", default="adapters", help="the adapter library folder (default: adapters)")
    gen.add_argument("--lora", action="append", type=_weighted, default=[], metavar="NAME[:WEIGHT]",
                     help="an adapter from the library and its weight (negative allowed); repeat for a mix")
    gen.add_argument("--prompt", required=True, help="the prompt; <lora:name:weight> tags also work")
    gen.add_argument("--negative-prompt", default="")
    gen.add_argument("--seed", type=int, default=-1, help="-1 picks a random seed")
    gen.add_argument("--steps", type=int, default=20)
    gen.add_argument("--guidance", type=float, default=7.5)
    gen.add_argument("--width", type=int, default=0, help="0: the model's native size")
    gen.add_argument("--height", type=int, default=0)
    gen.add_argument("--scheduler", choices=SCHEDULERS, default="Euler a")
    gen.add_argument("--count", type=int, default=1, help="images, with seeds seed, seed+1, ...")
    gen.add_argument("--grid", nargs="*", type=float, metavar="WEIGHT",
                     help="instead: one labelled grid of the first --lora at these weights (default 0 0.5 1)")
    gen.add_argument("--out", required=True, help="output PNG; with --count N, -1, -2 ... are added")


def _add_adapters_parser(commands) -> None:
    from sdlora.formats import FORMATS

    lib = commands.add_parser("adapters", help="list, import, export, rename or delete library adapters")
    _library_options(lib, argparse.SUPPRESS)
    lib.set_defaults(adapters_dir="adapters", base_model=None)
    verbs = lib.add_subparsers(dest="verb", required=True)
    imp = _verb(verbs, "import", "check a LoRA file (kohya, LyCORIS, ComfyUI, diffusers or PEFT) and bring it in")
    imp.add_argument("file")
    imp.add_argument("--name", help="library name (default: the file name; never overwrites)")
    exp = _verb(verbs, "export", "write an adapter in the kohya (every tool) or diffusers format")
    exp.add_argument("name")
    exp.add_argument("--format", choices=FORMATS, default=FORMATS[0])
    exp.add_argument("--out", required=True, help="output .safetensors file")
    _verb(verbs, "list", "one line per adapter, then any damaged entries")
    ren = _verb(verbs, "rename", "rename an adapter (its files and the name inside it)")
    ren.add_argument("name")
    ren.add_argument("new_name")
    dele = _verb(verbs, "delete", "delete an adapter and its side files")
    dele.add_argument("name")


def _add_queue_parser(commands) -> None:
    queue = commands.add_parser("queue", help="queue training jobs for the web app to run one after another",
                                description="The queue lives in <adapters>/.queue; a running `app.py` on the "
                                            "same adapters folder picks new jobs up within a second.")
    verbs = queue.add_subparsers(dest="verb", required=True)
    add = verbs.add_parser("add", help="queue a job with the train command's settings (its images are copied)")
    add.add_argument("--config", help="JSON or TOML file of settings; --output is the server's --adapters-dir")
    add_config_flags(add)
    for name, text in (("list", "one line per job: id, position, name, state, ETA, message"),
                       ("cancel", "cancel a queued job, or stop (and save) the running one")):
        verb = verbs.add_parser(name, help=text)
        verb.add_argument("--adapters-dir", default="adapters", help="the adapter library folder (default: adapters)")
        if name == "cancel":
            verb.add_argument("id", help="the job id, as `queue list` shows it")


def _verb(verbs, name: str, help_text: str) -> argparse.ArgumentParser:
    """A verb that also takes the library options after it, as people type them."""
    parser = verbs.add_parser(name, help=help_text)
    _library_options(parser, argparse.SUPPRESS)
    return parser


def _library_options(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument("--adapters-dir", default=default, help="the adapter library folder (default: adapters)")
    parser.add_argument("--base-model", default=default, help="check imports against this base model")


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
    config, defaults = config_and_defaults(args)
    is_main = PartialState(cpu=cpu_only()).is_main_process
    if is_main and not args.quiet:
        print(defaults)
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
        result = train(config, on_event=progress, stop=stop, resume=args.resume, overwrite=args.overwrite)
    finally:
        signal.signal(signal.SIGINT, previous)
        progress.close()
    if is_main:
        state = "stopped early at" if result.stopped_early else "finished"
        print(f"{state} step {result.steps}: adapter {result.adapter_path}, config {result.config_path}")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sdlora.generate import AdapterWeight, GenerateConfig, Generator
    from sdlora.store import AdapterLibrary

    quiet_library_progress_bars()
    config = GenerateConfig(prompt=args.prompt, negative_prompt=args.negative_prompt, seed=args.seed,
                            steps=args.steps, guidance=args.guidance, width=args.width, height=args.height,
                            scheduler=args.scheduler, count=args.count,
                            adapters=tuple(AdapterWeight(n, w) for n, w in args.lora))
    generator = Generator(args.base_model, AdapterLibrary(args.adapters_dir))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.grid is not None:
        generator.comparison_grid(config, weights=tuple(args.grid) or (0.0, 0.5, 1.0)).save(out)
        print(out)
        return 0
    for i, image in enumerate(generator.generate(config)):
        path = out if config.count == 1 else out.with_name(f"{out.stem}-{i + 1}{out.suffix}")
        image.save(path)
        print(f"{path}  seed {image.seed}")
    return 0


def run_adapters(args: argparse.Namespace) -> int:
    from datetime import datetime
    from pathlib import Path

    from sdlora.store import AdapterLibrary

    library = AdapterLibrary(args.adapters_dir)
    if args.verb == "list":
        listing = library.list()
        for a in listing.adapters:
            when = datetime.fromtimestamp(a.modified).strftime("%Y-%m-%d %H:%M")
            print(f"{a.name}\t{a.family}\trank {a.rank}\talpha {a.alpha}\tsteps {a.steps}\t"
                  f"trigger {', '.join(a.trigger_words) or '-'}\t{a.size_bytes / 1e6:.1f} MB\t{when}")
        for problem in listing.problems:
            print(f"damaged: {problem}", file=sys.stderr)
        return 0
    if args.verb == "import":
        if args.base_model:
            from sdlora.models import load_pipeline
            from sdlora.store import reference_from_pipeline

            library.reference = reference_from_pipeline(load_pipeline(args.base_model))
        print(library.import_file(args.file, name=args.name).path)
    elif args.verb == "export":
        import shutil
        import tempfile

        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
            shutil.move(library.export(args.name, args.format, scratch), out)
        print(out)
    elif args.verb == "rename":
        print(library.rename(args.name, args.new_name).path)
    elif args.verb == "delete":
        library.delete(args.name)
        print(f"deleted {args.name}")
    return 0


def run_queue(args: argparse.Namespace) -> int:
    from sdlora.queue import JobQueue

    if args.verb == "add":
        config = config_from_args(argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "verb"}))
        job = JobQueue(config.output_dir).add(config)
        print(f"queued job {job.id}: {job.name}")
        return 0
    queue = JobQueue(args.adapters_dir)
    if args.verb == "cancel":
        job = queue.cancel(args.id)
        print(f"job {job.id} ({job.name}): " + ("stopping; it saves after this step" if job.state == "running"
                                               else job.state))
        return 0
    for row in queue.rows():
        eta = f"{row.eta_seconds:.0f} s" if row.eta_seconds is not None else "-"
        print(f"{row.id}\t{row.position or '-'}\t{row.name}\t{row.state}\t{eta}\t{row.message}")
    return 0


def main(argv: list[str] | None = None) -> int:
    # transformers warns at import about optional image backends a trainer never uses.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            return run_train(args)
        if args.command == "generate":
            return run_generate(args)
        if args.command == "adapters":
            return run_adapters(args)
        if args.command == "queue":
            return run_queue(args)
    except SdloraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 1

