"""Command line: `python -m sdlora train ...`, also under `accelerate launch`.

The train flags are generated from the config dataclasses, so help texts and defaults
have one source. Precedence: dataclass defaults < --config file < flags on the line.
torch, diffusers and transformers are imported inside the run_* functions that use them, so
`--help`, a refused option and `adapters list` answer without loading them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import signal
import sys
from typing import Any

from sdlora import runtime
from sdlora.assets import DEMO_MODEL
from sdlora.config import SECTIONS, AdapterWeight, GenerateConfig, TrainConfig, field_help, read_config_file
from sdlora.errors import SdloraError
from sdlora.generation.defaults import MODEL_CHOSEN
from sdlora.settings import defaults_line, train_config_from
from sdlora.training.presets import PRESETS

# Flags that say how to run, not what to train: never passed on as TrainConfig settings.
NOT_SETTINGS = ("config", "preset", "resume", "command", "verb", "quiet", "overwrite")


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
            kwargs: dict[str, Any] = {
                "dest": f"{section}.{name}" if section else name,
                "default": None,
                "help": f"{info['help']} (default: {default!r})",
            }
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
    """A --config file, the flags given on the command line over it, and --preset: the one road's TrainConfig."""
    values: dict[str, Any] = read_config_file(args.config) if args.config else {}
    flags = {
        dest: tuple(value) if isinstance(value, list) else value
        for dest, value in vars(args).items()
        if value is not None and dest not in NOT_SETTINGS
    }
    source = f"{args.config} and the command line" if args.config and flags else args.config or "command line"
    return train_config_from({**values, **flags}, preset=args.preset, source=source)


def add_run_flags(parser: argparse.ArgumentParser, config_help: str) -> None:
    """--config and --preset, which say where settings come from, then one flag per setting."""
    parser.add_argument("--config", help=config_help)
    parser.add_argument(
        "--preset",
        choices=[name for name in PRESETS if name != "Demo"],
        help="start from the settings for this kind of concept (the demo model always uses its own)",
    )
    add_config_flags(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sdlora", description="Train and use Stable Diffusion LoRAs."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train",
        help="train a LoRA adapter from a folder of concept images",
        description="Train a LoRA on the denoiser's attention projections (UNet or transformer). Runs unchanged "
        "under `accelerate launch` on several GPUs.",
    )
    train.add_argument("--resume", metavar="CKPT", help="checkpoint folder to continue from, or 'latest'")
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="start over although this --name already has an adapter or checkpoints in --output",
    )
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    add_run_flags(train, "JSON or TOML file of settings (as saved beside every adapter)")
    _add_generate_parser(commands)
    _add_adapters_parser(commands)
    _add_caption_parser(commands)
    _add_queue_parser(commands)
    return parser


def _weighted(text: str) -> tuple[str, float]:
    name, _, weight = text.rpartition(":") if ":" in text else (text, "", "1")
    try:
        return name, float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lora {text!r}: expected NAME or NAME:WEIGHT") from None


def _baked(text: str) -> tuple[str, float, str]:
    """`--lora NAME[:WEIGHT][:lbw=BLOCK_WEIGHTS]` for bake: block weights as in a <lora:...> prompt tag."""
    head, _, block_weights = text.partition(":lbw=")
    return (*_weighted(head), block_weights)


def _add_generate_parser(commands) -> None:
    gen = commands.add_parser("generate", help="generate images with a mix of library adapters")
    gen.add_argument(
        "--base-model",
        default=str(DEMO_MODEL),
        help="hub id, diffusers folder or .safetensors file (default: the demo model, as in the app)",
    )
    gen.add_argument(
        "--adapters-dir", default="adapters", help="the adapter library folder (default: adapters)"
    )
    add_generate_flags(gen)
    gen.add_argument(
        "--grid",
        nargs="*",
        type=float,
        metavar="WEIGHT",
        help="instead: one labelled grid of the first --lora at these weights (default 0 0.5 1)",
    )
    gen.add_argument("--out", required=True, help="output PNG; with --count N, -1, -2 ... are added")


def add_generate_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per GenerateConfig field, with its help and default; adapters are --lora NAME[:WEIGHT], repeated."""
    for name, info in field_help(GenerateConfig).items():
        default = info["default"]
        if name == "adapters":
            parser.add_argument(
                _flag(name, info),
                dest=name,
                action="append",
                type=_weighted,
                default=[],
                metavar="NAME[:WEIGHT]",
                help=f"{info['help']} Repeat for a mix.",
            )
        elif default is dataclasses.MISSING:
            parser.add_argument(_flag(name, info), dest=name, required=True, help=info["help"])
        else:
            # Left out, steps, guidance and sampler are the base model's (None until it is known).
            chosen = name in MODEL_CHOSEN
            parser.add_argument(
                _flag(name, info),
                dest=name,
                type=type(default),
                default=None if chosen else default,
                choices=info.get("choices"),
                help=f"{info['help']} (default: {default!r}"
                + ("; SD3.5 and Flux.1: their model card's)" if chosen else ")"),
            )


def generate_config_from_args(args: argparse.Namespace) -> tuple[GenerateConfig, set[str]]:
    """The GenerateConfig the generate flags describe, and the model-chosen settings left out (at
    GenerateConfig's defaults until the base model is known)."""
    unset = {name for name in MODEL_CHOSEN if getattr(args, name) is None}
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(GenerateConfig)}
    values["adapters"] = tuple(AdapterWeight(n, w) for n, w in args.adapters)
    return GenerateConfig(**{k: v for k, v in values.items() if k not in unset}), unset


def _add_adapters_parser(commands) -> None:
    from sdlora.library.formats import FORMATS

    lib = commands.add_parser("adapters", help="list, import, export, rename or delete library adapters")
    _library_options(lib, argparse.SUPPRESS)
    lib.set_defaults(adapters_dir="adapters", base_model=None)
    verbs = lib.add_subparsers(dest="verb", required=True)
    imp = _verb(
        verbs, "import", "check a LoRA file (kohya, LyCORIS, ComfyUI, diffusers or PEFT) and bring it in"
    )
    imp.add_argument("file")
    imp.add_argument("--name", help="library name (default: the file name; never overwrites)")
    imp.add_argument(
        "--alpha", type=float, help="alpha of a file that keeps none (PEFT without adapter_config.json)"
    )
    exp = _verb(verbs, "export", "write an adapter in the kohya (every tool) or diffusers format")
    exp.add_argument("name")
    exp.add_argument("--format", choices=FORMATS, default=FORMATS[0])
    exp.add_argument("--out", required=True, help="output .safetensors file")
    lbw = _verb(verbs, "block-weights", "a new adapter with a weight per block applied (LoRA Block Weight)")
    lbw.add_argument("name")
    lbw.add_argument(
        "--lbw", required=True, help="a preset (INS, IND, MIDD, OUTD, OUTS, ALL, ...) or weights: 1,0,..."
    )
    lbw.add_argument("--as", dest="as_name", required=True, help="the new adapter's name (never overwrites)")
    _verb(verbs, "list", "one line per adapter, then any damaged entries")
    ren = _verb(verbs, "rename", "rename an adapter (its files and the name inside it)")
    ren.add_argument("name")
    ren.add_argument("new_name")
    dele = _verb(verbs, "delete", "delete an adapter and its side files")
    dele.add_argument("name")
    size = _verb(verbs, "resize", "a new adapter at a lower rank (truncated SVD of each layer's update)")
    size.add_argument("name")
    size.add_argument(
        "--rank", type=int, help="the new rank (with --keep or --ratio: the most a layer keeps)"
    )
    size.add_argument("--keep", type=float, help="per layer, the rank that keeps this fraction of its norm")
    size.add_argument("--ratio", type=float, help="per layer, singular values >= this x the largest")
    mix = _verb(verbs, "merge", "several adapters with weights as one new adapter (NAME:WEIGHT ...)")
    mix.add_argument("weighted", nargs="+", metavar="NAME:WEIGHT")
    mix.add_argument("--rank", type=int, help="SVD of the sum to this rank (default: exact, ranks add up)")
    for verb in (size, mix):
        verb.add_argument(
            "--as", dest="new_name", required=True, metavar="NEW", help="the new adapter's name"
        )
        verb.add_argument("--overwrite", action="store_true", help="replace an adapter of that name")
    _add_checkpoint_verbs(verbs)
    for name in ("resize", "merge", "extract", "bake"):
        verbs.choices[name].add_argument("--quiet", action="store_true", help="no progress on stderr")


def _add_checkpoint_verbs(verbs) -> None:
    """`keep` and `compare`: the adapters a run saved along the way (--adapter-every, validation)."""
    from sdlora.generation.checkpoint_grid import Comparison

    keep = _verb(verbs, "keep", "make a checkpoint adapter of a run the adapter (the others stay)")
    keep.add_argument("name")
    keep.add_argument("--step", type=int, required=True, help="the checkpoint's step")
    compare = _verb(
        verbs,
        "compare",
        "a grid of a run's checkpoint adapters x weights x prompts, validation loss under each",
    )
    compare.add_argument("name")
    compare.add_argument("--weights", default="1.0", help="comma-separated adapter weights (default: 1.0)")
    compare.add_argument("--prompts", nargs="*", default=[], help="default: the trigger word")
    compare.add_argument("--seeds", nargs="*", type=int, default=[1], help="default: 1")
    compare.add_argument("--inference-steps", type=int, default=20, help="denoising steps (default: 20)")
    compare.add_argument(
        "--evaluator-prompts",
        type=int,
        default=Comparison.evaluator_prompts,
        help="on the demo model, trigger and trigger-free prompts the demo evaluator scores per checkpoint "
        f"(default: {Comparison.evaluator_prompts} of each; 0: none)",
    )
    compare.add_argument("--out", required=True, help="output PNG")
    ext = _verb(verbs, "extract", "a LoRA from the difference of a fine-tuned model and its base")
    ext.add_argument("--base", required=True, help="the base model: hub id, diffusers folder or .safetensors")
    ext.add_argument("--tuned", required=True, help="the fine-tuned model, in any of the same forms")
    ext.add_argument("--rank", type=int, help="rank of every layer (or --keep)")
    ext.add_argument(
        "--keep", type=float, help="per layer, the smallest rank keeping this fraction of the norm"
    )
    ext.add_argument("--threshold", type=float, help="leave out layers changed less than this (relative)")
    ext.add_argument("--as", dest="new_name", required=True, help="library name of the new adapter")
    bake = _verb(
        verbs, "bake", "a mix of adapters merged into the base (--base-model), saved as a full model"
    )
    bake.add_argument(
        "--lora",
        dest="adapters",
        action="append",
        type=_baked,
        required=True,
        help="NAME[:WEIGHT][:lbw=PRESET_OR_LIST], repeated (block weights as in a <lora:...> tag)",
    )
    bake.add_argument(
        "--out", required=True, help="a folder (diffusers) or a .safetensors file (single file)"
    )
    bake.add_argument("--dtype", choices=("fp16", "bf16"), help="save in half precision (default float32)")


def _add_caption_parser(commands) -> None:
    from sdlora.captioning.captioners import captioner_names
    from sdlora.captioning.captions import CaptionOptions

    cap = commands.add_parser(
        "caption",
        help="write a same-name .txt caption for every image in a folder",
        description="Caption concept images. Existing captions are kept unless "
        "--overwrite; files are written atomically.",
    )
    cap.add_argument("--images", required=True, help="folder of concept images")
    cap.add_argument(
        "--captioner",
        choices=captioner_names(),
        help="default: the demo captioner for the demo model, else the first one present here",
    )
    cap.add_argument(
        "--captioner-model",
        default="",
        metavar="HUB_ID_OR_FOLDER",
        help="the captioner's weights from another hub id or a local folder saved with "
        "save_pretrained (default: the captioner's own hub id, from the local cache offline)",
    )
    cap.add_argument("--base-model", default=str(DEMO_MODEL), help="picks the default captioner")
    help_of = field_help(CaptionOptions)
    for name in ("prefix", "max_words", "batch_size"):
        info = help_of[name]
        cap.add_argument(
            "--" + name.replace("_", "-"),
            type=type(info["default"]),
            default=info["default"],
            help=f"{info['help']} (default: {info['default']!r})",
        )
    cap.add_argument(
        "--drop",
        nargs="*",
        default=list(help_of["drop_words"]["default"]),
        metavar="WORD",
        help=help_of["drop_words"]["help"],
    )
    cap.add_argument("--overwrite", action="store_true", help=help_of["overwrite"]["help"])


def _add_queue_parser(commands) -> None:
    queue = commands.add_parser(
        "queue",
        help="queue training jobs for the web app to run one after another",
        description="The queue lives in <adapters>/.queue; a running `app.py` on the "
        "same adapters folder picks new jobs up within a second.",
    )
    verbs = queue.add_subparsers(dest="verb", required=True)
    add = verbs.add_parser(
        "add", help="queue a job with the train command's settings (its images are copied)"
    )
    add_run_flags(add, "JSON or TOML file of settings; --output is the server's --adapters-dir")
    for name, text in (
        ("list", "one line per job: id, position, name, state, ETA, message"),
        ("cancel", "cancel a queued job, or stop (and save) the running one"),
    ):
        verb = verbs.add_parser(name, help=text)
        verb.add_argument(
            "--adapters-dir", default="adapters", help="the adapter library folder (default: adapters)"
        )
        if name == "cancel":
            verb.add_argument("id", help="the job id, as `queue list` shows it")


def _verb(verbs, name: str, help_text: str) -> argparse.ArgumentParser:
    """A verb that also takes the library options after it, as people type them."""
    parser = verbs.add_parser(name, help=help_text)
    _library_options(parser, argparse.SUPPRESS)
    return parser


def _library_options(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument(
        "--adapters-dir", default=default, help="the adapter library folder (default: adapters)"
    )
    parser.add_argument("--base-model", default=default, help="check imports against this base model")


def run_train(args: argparse.Namespace) -> int:
    config = config_from_args(args)  # checked before anything heavy loads: a mistake is refused at once
    from accelerate import PartialState

    from sdlora.events import StopFlag
    from sdlora.progress import ConsoleProgress
    from sdlora.training.loop import cpu_only, train

    is_main = PartialState(cpu=cpu_only()).is_main_process
    if is_main and not args.quiet:
        print(defaults_line(config.base_model))
    progress = ConsoleProgress(enabled=is_main and not args.quiet)
    stop = StopFlag()

    def first_ctrl_c_stops_cleanly(signum, frame):
        if stop.requested:
            raise KeyboardInterrupt
        stop.request()
        if is_main:
            print(
                "\nstopping after this step and saving (Ctrl-C again to abort without saving)",
                file=sys.stderr,
            )

    previous = signal.signal(signal.SIGINT, first_ctrl_c_stops_cleanly)
    try:
        result = train(config, on_event=progress, stop=stop, resume=args.resume, overwrite=args.overwrite)
    finally:
        signal.signal(signal.SIGINT, previous)
        progress.close()
    if is_main:
        state = "stopped early at" if result.stopped_early else "finished"
        saved = (
            f"adapter {result.adapter_path}, config {result.config_path}"
            if result.adapter_path
            else result.message
        )
        print(f"{state} step {result.steps}: {saved}")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sdlora.generation.defaults import with_model_defaults
    from sdlora.generation.generate import Generator
    from sdlora.library.store import AdapterLibrary

    config, unset = generate_config_from_args(args)
    generator = Generator(args.base_model, AdapterLibrary(args.adapters_dir))
    config = with_model_defaults(config, generator.sampling_defaults, unset)
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


def import_base_model(given: str | None) -> str:
    """The model an import is checked against: --base-model, else the app's default (the demo model)."""
    if given:
        return given
    if not DEMO_MODEL.is_dir():
        raise SdloraError(
            "adapters import: pass --base-model; without it the file is checked against the "
            f"default base model {DEMO_MODEL}, which is not installed here"
        )
    return str(DEMO_MODEL)


@contextlib.contextmanager
def against_base_model(library, given: str | None):
    """Check the library's files against --base-model, else the default one (a refusal then says so)."""
    from sdlora.errors import AdapterFormatError
    from sdlora.library.store import reference_from_pipeline
    from sdlora.models.loading import load_pipeline

    library.reference = reference_from_pipeline(load_pipeline(import_base_model(given)))
    try:
        yield
    except AdapterFormatError as exc:
        if given:
            raise
        raise AdapterFormatError(
            f"{exc} (checked against the default base model; pass --base-model)"
        ) from None


def run_adapters(args: argparse.Namespace) -> int:
    from datetime import datetime
    from pathlib import Path

    from sdlora.library.formats.files import file_size
    from sdlora.library.store import AdapterLibrary

    library = AdapterLibrary(args.adapters_dir)
    if args.verb == "list":
        listing = library.list(whole=False)  # headers only: a quick look, no torch
        for a in listing.adapters:
            when = datetime.fromtimestamp(a.modified).strftime("%Y-%m-%d %H:%M")
            print(
                f"{a.name}\t{a.family}\trank {a.rank}\talpha {a.alpha}\tsteps {a.steps}\t"
                f"trigger {', '.join(a.trigger_words) or '-'}\t{file_size(a.size_bytes)}\t{when}"
            )
        for problem in listing.problems:
            print(f"damaged: {problem}", file=sys.stderr)
        return 0
    if args.verb == "import":
        with against_base_model(library, args.base_model):
            print(library.import_file(args.file, name=args.name, alpha=args.alpha).path)
    elif args.verb == "export":
        import shutil
        import tempfile

        out = Path(args.out)
        # The base model's layout names and shapes the layers; plain kohya files carry both themselves.
        needed = bool(args.base_model) or library.needs_base(args.name)
        with against_base_model(library, args.base_model) if needed else contextlib.nullcontext():
            out.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
                shutil.move(library.export(args.name, args.format, scratch), out)
        print(out)
    elif args.verb == "block-weights":
        from sdlora.library.tools.block_weights import save_with_block_weights

        needed = bool(args.base_model) or library.needs_base(args.name)  # as for export, below
        with against_base_model(library, args.base_model) if needed else contextlib.nullcontext():
            print(save_with_block_weights(library, args.name, args.lbw, args.as_name).path)
    elif args.verb == "rename":
        print(library.rename(args.name, args.new_name).path)
    elif args.verb == "delete":
        library.delete(args.name)
        print(f"deleted {args.name}")
    elif args.verb in ("keep", "compare"):
        return run_checkpoint_verb(args)
    elif args.verb in ("resize", "merge", "extract", "bake"):
        print("\n".join(run_tool(library, args).lines()))
    return 0


def run_tool(library, args: argparse.Namespace):
    """`adapters resize|merge|extract|bake`, their progress on stderr unless --quiet; the report."""
    from sdlora.library.tools import bake, extract
    from sdlora.library.tools.merge import merge_in_library, parse_weighted
    from sdlora.library.tools.resize import resize_in_library
    from sdlora.library.tools.saving import check_against
    from sdlora.progress import ToolProgress

    progress = ToolProgress(args.verb, enabled=not args.quiet)
    try:
        if args.verb == "extract":
            return extract.run_from_cli(library, args, progress)
        if args.verb == "bake":
            return bake.run_from_cli(library, args, import_base_model(args.base_model), progress)
        library = check_against(library, args.base_model)
        if args.verb == "resize":
            rule = (args.rank, args.keep, args.ratio)
            return resize_in_library(library, args.name, args.new_name, *rule, args.overwrite, progress)
        weighted = [parse_weighted(text) for text in args.weighted]
        return merge_in_library(library, weighted, args.new_name, args.rank, args.overwrite, progress)
    finally:
        progress.close()


def run_checkpoint_verb(args: argparse.Namespace) -> int:
    """`adapters keep NAME --step N` and `adapters compare NAME ... --out grid.png`."""
    from pathlib import Path

    from sdlora.training.checkpoint_adapters import keep_checkpoint

    if args.verb == "keep":
        path = keep_checkpoint(args.adapters_dir, args.name, args.step)
        print(f"{args.name}: the checkpoint of step {args.step} is the adapter now ({path})")
        return 0
    from sdlora.generation.checkpoint_grid import Comparison, compare_checkpoints

    comparison = Comparison(
        weights=_weights(args.weights),
        prompts=tuple(args.prompts),
        seeds=tuple(args.seeds),
        steps=args.inference_steps,
        evaluator_prompts=args.evaluator_prompts,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compared = compare_checkpoints(
        import_base_model(args.base_model), args.adapters_dir, args.name, comparison
    )
    compared.image.save(out)
    print(out)
    if compared.scores:  # only where the demo evaluator can read the images
        print("\n".join(compared.summary()))
    return 0


def _weights(text: str) -> tuple[float, ...]:
    """--weights 0.5,1.0 as numbers; a bad one is named."""
    try:
        weights = tuple(float(w) for w in text.split(",") if w.strip())
    except ValueError:
        raise SdloraError(f"--weights {text!r}: expected numbers separated by commas, e.g. 0.5,1.0") from None
    if not weights:
        raise SdloraError("--weights is empty; give at least one weight, e.g. 1.0")
    return weights


def run_caption(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sdlora.captioning.captioners import captioner_of_folder, default_captioner, load_captioner
    from sdlora.captioning.captions import CaptionOptions, caption_images, write_caption_files
    from sdlora.errors import ConceptImagesError
    from sdlora.training.data import IMAGE_EXTENSIONS

    folder = Path(args.images)
    if not folder.is_dir():
        raise ConceptImagesError(f"{folder} is not a folder of images")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not images:
        raise ConceptImagesError(f"{folder} has no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    if args.captioner:
        name = args.captioner
    else:  # weights given without a name: the kind of model in them says which captioner they are
        name = (
            captioner_of_folder(args.captioner_model)
            if args.captioner_model
            else default_captioner(args.base_model)
        )
    options = CaptionOptions(
        prefix=args.prefix,
        overwrite=args.overwrite,
        max_words=args.max_words,
        drop_words=tuple(args.drop),
        batch_size=args.batch_size,
    )
    print(f"captioner: {name}" + (f" ({args.captioner_model})" if args.captioner_model else ""), flush=True)
    captioner = load_captioner(name, source=args.captioner_model or None)
    result = caption_images(
        captioner, images, options, on_caption=lambda c: print(f"{c.path.name}: {c.caption}", flush=True)
    )
    write_caption_files(result)
    print(result.summary(), file=sys.stderr if result.problems else sys.stdout)
    return 0 if result.captions or not result.problems else 2


def run_queue(args: argparse.Namespace) -> int:
    from sdlora.jobs.queue import JobQueue

    if args.verb == "add":
        config = config_from_args(args)
        job = JobQueue(config.output_dir).add(config)
        print(f"queued job {job.id}: {job.name}")
        return 0
    queue = JobQueue(args.adapters_dir)
    if args.verb == "cancel":
        job = queue.cancel(args.id)
        print(
            f"job {job.id} ({job.name}): "
            + ("stopping; it saves after this step" if job.state == "running" else job.state)
        )
        return 0
    for row in queue.rows():
        eta = f"{row.eta_seconds:.0f} s" if row.eta_seconds is not None else "-"
        print(f"{row.id}\t{row.position or '-'}\t{row.name}\t{row.state}\t{eta}\t{row.message}")
    return 0


def main(argv: list[str] | None = None) -> int:
    runtime.prepare()  # again for callers other than __main__; torch may be loaded by now
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            return run_train(args)
        if args.command == "generate":
            return run_generate(args)
        if args.command == "adapters":
            return run_adapters(args)
        if args.command == "caption":
            return run_caption(args)
        if args.command == "queue":
            return run_queue(args)
    except SdloraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 1
