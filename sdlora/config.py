"""Configuration of a training run: frozen dataclasses, the one home of every default.

Each field carries its help text (and, where the CLI uses a short name, its flag) in
`metadata`, so the CLI and the UI are generated from these classes instead of keeping
a second copy of the defaults. Files are read strictly: an unknown key is an error.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdlora.assets import DEMO_MODEL
from sdlora.errors import ConfigError

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
MIXED_PRECISION_CHOICES = ("auto", "no", "fp16", "bf16")
LR_SCHEDULE_CHOICES = ("constant", "cosine")
OPTIMIZER_CHOICES = ("adamw", "adamw8bit", "adafactor", "prodigy")
QUANTIZE_BASE_CHOICES = ("none", "int8", "nf4")
SCHEDULERS = ("Euler a", "DPM++ 2M", "DDIM", "Euler")
# How the flow-matching families (SD3.5, Flux.1) draw training sigmas and weight the loss, in diffusers'
# script names; "default" is the family's own (SD3: logit_normal, Flux.1: uniform).
WEIGHTING_SCHEMES = ("logit_normal", "uniform", "mode", "sigma_sqrt", "cosmap")
WEIGHTING_CHOICES = ("default", *WEIGHTING_SCHEMES)
# Flux.1 dev is guidance-distilled; training feeds its guidance embedding one constant, 3.5 as
# diffusers' train_dreambooth_lora_flux.py (--guidance_scale, commit 58eb52c).
FLUX_TRAINING_GUIDANCE = 3.5
T5_MAX_TOKENS = 512  # the SD3 and Flux pipelines refuse a longer max_sequence_length
MODEL_SAMPLER = "auto"  # GenerateConfig.scheduler left out: the base model's own (generation/defaults.py)

# Adapter names become file names in the library and in every tool that reads it. 100 characters
# (and 200 UTF-8 bytes) leave room for the longest file derived from a name, the atomic-write temp
# file `.<name>.safetensors.<8 random>.tmp`, under the 255-byte name limit of ext4, APFS and NTFS.
MAX_NAME_CHARS = 100
MAX_NAME_BYTES = 200
WINDOWS_RESERVED = frozenset(
    {"CON", "PRN", "AUX", "NUL", *(f"{p}{n}" for p in ("COM", "LPT") for n in range(10))}
)
ILLEGAL_NAME_CHARS = re.compile(r'[<>:"/\\|?*\x00-\x1f]')
# Adapter weights: useful mixes stay within about [-2, 2]; 10 leaves room to push a weak adapter,
# while 1e15 (or NaN) only turns every pixel into noise and overflows a half-precision fused UNet.
MAX_ADAPTER_WEIGHT = 10.0
MAX_BLOCK_WEIGHTS_CHARS = 600  # Flux's 61 weights written out with decimals
MAX_GUIDANCE = 30.0  # the top of AUTOMATIC1111's CFG slider; far beyond it images only burn out
# Sizes: a UNet works at up to about twice its native side (hires-fix territory); beyond that it only
# repeats its subject and costs quadratically more (1024 px on the 64-px demo model: 169 s a step on
# a CPU). The pixel cap bounds any model, SDXL included: 4 MP is (2 x 1024)^2.
MAX_SIDE_FACTOR = 2
MAX_PIXELS = 2048 * 2048
# Prompts: CLIP reads 77 tokens and T5 at most 512; a token is about four characters of English, so
# 3000 characters hold the longest prompt any supported encoder reads plus <lora:...> tags. A longer
# one is only cut off by the tokenizer, after it has cost every other user's request its time.
MAX_PROMPT_CHARS = 3000
MAX_SEED = 2**32 - 1  # numpy's seed range (accelerate's set_seed seeds numpy too)
MAX_PREVIEWS = 16  # preview prompts, and seeds: each pair is an image drawn at every preview step
# Bidirectional controls reorder what a name shows: "\u202egnp.exe" displays as "exe.png".
BIDI_CONTROLS = re.compile("[\u200e\u200f\u061c\u202a-\u202e\u2066-\u2069]")
TARGET_MODULE = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")


def check_adapter_name(name: str, what: str = "adapter name") -> None:
    """Refuse, in one line, a name that is not a portable file name on Linux, macOS and Windows."""
    shown = repr(name if len(name) <= 60 else name[:57] + "...")
    if not name or not name.strip():
        raise ConfigError(f"{what} is empty; give the adapter a name")
    if len(name) > MAX_NAME_CHARS or len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise ConfigError(
            f"{what} {shown} is {len(name)} characters long; at most {MAX_NAME_CHARS} are allowed"
        )
    bad = ILLEGAL_NAME_CHARS.search(name) or BIDI_CONTROLS.search(name)
    if bad:
        raise ConfigError(
            f"{what} {shown} must be a plain file name: it contains {bad.group()!r} "
            '(no / \\ : * ? " < > |, control or text-direction characters)'
        )
    if name.startswith(".") or name.startswith(" ") or name.endswith((".", " ")):
        raise ConfigError(
            f"{what} {shown} starts with a dot or a space or ends with one; "
            "Windows and the library's hidden files forbid that"
        )
    if name.split(".")[0].rstrip(" ").upper() in WINDOWS_RESERVED:
        raise ConfigError(
            f"{what} {shown} is a reserved device name on Windows (CON, PRN, AUX, NUL, COM0-9, "
            "LPT0-9, with or without an extension); pick another"
        )


def check_image_size(width: int, height: int, native: int | None, what: str = "image size") -> None:
    """Refuse a size beyond MAX_SIDE_FACTOR x the model's native side (when known) or MAX_PIXELS."""
    if native and max(width, height) > MAX_SIDE_FACTOR * native:
        raise ConfigError(
            f"{what} {width}x{height} is too large for this base model (native {native} px): "
            f"at most {MAX_SIDE_FACTOR * native} px a side"
        )
    if width * height > MAX_PIXELS:
        raise ConfigError(
            f"{what} {width}x{height} is too large: at most {MAX_PIXELS:,} pixels "
            f"({int(math.sqrt(MAX_PIXELS))}x{int(math.sqrt(MAX_PIXELS))})"
        )


def _opt(
    default: Any,
    help: str,
    flag: str | None = None,
    choices: tuple | None = None,
    bounds: tuple[float, float] | None = None,
    max_items: int | None = None,
    max_chars: int | None = None,
) -> Any:
    """A field with its help text and limits; `dataclasses.MISSING` as the default makes it required.

    `bounds` (inclusive) hold for a number and for every number of a list; `max_items` caps a
    list's length and `max_chars` each text. `check_fields` enforces them all.
    """
    meta = {"help": help, "flag": flag, "choices": choices}
    meta.update(
        {k: v for k, v in (("bounds", bounds), ("max_items", max_items), ("max_chars", max_chars)) if v}
    )
    if default is dataclasses.MISSING:
        return field(metadata=meta)
    if isinstance(default, (list, dict, tuple)):
        return field(default_factory=lambda: default, metadata=meta)
    return field(default=default, metadata=meta)


# The one convention for a new concept's word: a rare token (one token in SD's and the demo's
# tokenizers) that the base model draws nothing in particular for, as DreamBooth's examples use.
TRIGGER_WORD = "sks"
PREVIEWS_PER_RUN = 4  # previews a run shows when the interval follows its length


def preview_interval(steps: int) -> int:
    """Steps between previews for a run of `steps`: PREVIEWS_PER_RUN of them, never fewer than one."""
    return max(1, steps // PREVIEWS_PER_RUN)


def check_fields(settings: Any) -> None:
    """Refuse, in one line naming the field, a value outside its field's bounds, NaN or infinity, or an oversize text or list."""
    for f in dataclasses.fields(settings):
        value, meta = getattr(settings, f.name), f.metadata
        items = value if isinstance(value, tuple) else (value,)
        if "max_items" in meta and len(items) > meta["max_items"]:
            raise ConfigError(f"{f.name} has {len(items)} entries; at most {meta['max_items']} are allowed")
        for item in items:
            if "max_chars" in meta and isinstance(item, str) and len(item) > meta["max_chars"]:
                raise ConfigError(
                    f"{f.name} is {len(item):,} characters long; at most {meta['max_chars']:,} are read"
                )
            if "bounds" in meta:
                _check_number(f.name, item, meta["bounds"], whole="int" in str(f.type))


def _check_number(name: str, value: Any, bounds: tuple[float, float], whole: bool) -> None:
    low, high = bounds
    kind = "a whole number" if whole else "a number"
    number = not isinstance(value, bool) and isinstance(value, int if whole else (int, float))
    # An int is always finite (and math.isfinite cannot take one beyond a float's range).
    if not (number and (isinstance(value, int) or math.isfinite(value)) and low <= value <= high):
        raise ConfigError(
            f"{name} must be {kind} from {_number(low)} to {_number(high)}, got {_shown_value(value)}"
        )


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


@dataclass(frozen=True)
class LoraSpec:
    """Shape of the adapter: which layers it adapts and how strongly."""

    rank: int = _opt(8, "LoRA rank r: size of the low-rank update (4-32 is typical).", bounds=(1, 1024))
    alpha: float = _opt(8.0, "LoRA alpha: the update is scaled by alpha/rank.", bounds=(1e-3, 4096))
    dropout: float = _opt(0.0, "Dropout on the LoRA input during training.", bounds=(0, 0.99))
    target_modules: tuple[str, ...] = _opt(
        ATTENTION_PROJECTIONS,
        "UNet modules to adapt (name suffixes).",
        flag="--targets",
        max_items=64,
        max_chars=100,
    )
    extra_target_modules: tuple[str, ...] = _opt(
        (),
        "More denoiser modules to adapt besides the attention projections, e.g. ff.net.2 proj_in (UNet), ff proj_mlp (Flux.1).",
        flag="--extra-targets",
        max_items=64,
        max_chars=100,
    )

    @property
    def scale(self) -> float:
        """The factor alpha/rank that multiplies B·A."""
        return self.alpha / self.rank

    @property
    def all_target_modules(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.target_modules + self.extra_target_modules))

    def validate(self) -> None:
        check_fields(self)
        if not self.all_target_modules:
            raise ConfigError("at least one target module is needed")
        for module in self.all_target_modules:
            # peft would read "*" or a pattern as a regex over every layer: a module name is dotted words.
            if not isinstance(module, str) or not TARGET_MODULE.fullmatch(module):
                raise ConfigError(
                    f"target module {module!r} is not a module name suffix such as to_q or ff.net.2"
                )


@dataclass(frozen=True)
class DataConfig:
    """Where the concept images are and how they become training examples."""

    images: str = _opt("", "Folder of concept images, with optional same-name .txt captions.")
    trigger_word: str = _opt(
        TRIGGER_WORD,
        "Word that calls up the concept in prompts; put in front of every caption that lacks it "
        "(empty: none).",
        flag="--trigger",
        max_chars=200,
    )
    caption_template: str = _opt(
        "{trigger}",
        "Caption for images without a .txt file; {trigger} is replaced by the trigger word.",
        max_chars=MAX_PROMPT_CHARS,
    )
    resolution: int = _opt(
        512,
        "Training resolution in pixels: images train at about resolution² pixels.",
    )
    buckets: bool = _opt(
        True,
        "Keep each image's aspect ratio: train it in the bucket of about resolution² "
        "pixels nearest its shape (kohya's buckets); off: centre-crop every image square.",
    )
    flip: bool = _opt(
        False, "Also train on horizontally flipped copies (not for text or asymmetric subjects)."
    )
    regularization_images: str = _opt(
        "",
        "Folder of regularisation images with captions (kohya's reg folder): ordinary images of what "
        "prompts without the trigger should keep drawing; trained beside the concept to stop it leaking.",
        flag="--reg-images",
    )

    def validate(self) -> None:
        if not self.images:
            raise ConfigError("no concept images given: pass --images DIR")
        check_fields(self)
        if self.resolution < 8 or self.resolution % 8:
            raise ConfigError(f"resolution must be a multiple of 8, got {self.resolution}")
        check_image_size(self.resolution, self.resolution, None, "training resolution")


TRACKERS = ("", "tensorboard", "wandb")


@dataclass(frozen=True)
class ValidationConfig:
    """Knowing when a run is done: held-out images scored as it trains, adapters saved along the way."""

    validation_images: int = _opt(
        0,
        "Concept images held out of training and scored instead (a seeded choice among them; "
        "at least one must remain to train on; 0: none).",
        bounds=(0, 100_000),
    )
    validation_folder: str = _opt(
        "",
        "Folder of validation images with same-name .txt captions, scored but never trained on "
        "(the training images stay all the concept images).",
    )
    validation_every: int = _opt(
        0,
        "Steps between validation losses (0: about ten a run).",
        bounds=(0, 100_000),
    )
    stop_when_validation_rises: int = _opt(
        0,
        "Stop after this many evaluations in a row above the lowest validation loss, and keep the best "
        "checkpoint adapter as the adapter (0: never stop early).",
        bounds=(0, 10_000),
    )
    adapter_every: int = _opt(
        0,
        "Save a library-loadable adapter every N steps (<name>-step<N>.safetensors, to compare and keep "
        "one; 0: with validation, at every evaluation; else none).",
        bounds=(0, 100_000),
    )
    adapter_every_epochs: int = _opt(
        0,
        "Save a library-loadable adapter every N epochs (passes over the concept images) instead of every "
        "N steps; 0: by steps.",
        bounds=(0, 100_000),
    )
    log_with: str = _opt(
        "", "Also log the losses, learning rate and previews to tensorboard or wandb.", choices=TRACKERS
    )

    @property
    def enabled(self) -> bool:
        """Whether any images are scored."""
        return bool(self.validation_images or self.validation_folder)

    def validate(self) -> None:
        check_fields(self)
        if self.log_with not in TRACKERS:
            raise ConfigError(f"log_with must be tensorboard or wandb (or empty), got {self.log_with!r}")
        if self.validation_images and self.validation_folder:
            raise ConfigError(
                "validation_images and validation_folder both given; hold images out or name a folder, not both"
            )
        if self.adapter_every and self.adapter_every_epochs:
            raise ConfigError(
                "adapter_every and adapter_every_epochs both given; save adapters by steps or by epochs, not both"
            )
        if self.stop_when_validation_rises and not self.enabled:
            raise ConfigError(
                "stop_when_validation_rises needs validation images: pass --validation-images N "
                "or --validation-folder DIR"
            )


def validation_interval(steps: int) -> int:
    """Steps between validation losses when none is given: ten evaluations a run, never fewer than one step."""
    return max(1, steps // 10)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run; saved beside the adapter to reproduce it."""

    base_model: str = _opt(
        str(DEMO_MODEL), "Base model: hub id, local diffusers folder, or single-file .safetensors."
    )
    output_dir: str = _opt(
        "adapters",
        "The adapter library: the adapter, its config, previews and checkpoints go here.",
        flag="--output",
    )
    name: str = _opt("my-lora", "Adapter name; the file is <output>/<name>.safetensors.")
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSpec = field(default_factory=LoraSpec)
    steps: int = _opt(1000, "Optimizer steps to train.", bounds=(1, 100_000))
    batch_size: int = _opt(1, "Images per step on each device.", bounds=(1, 64))
    gradient_accumulation_steps: int = _opt(
        1, "Micro-batches summed into one optimizer step.", bounds=(1, 256)
    )
    learning_rate: float = _opt(
        1e-4, "Peak learning rate (Prodigy finds its own: use 1.0 with it).", flag="--lr", bounds=(1e-8, 10)
    )
    optimizer: str = _opt(
        "adamw",
        "adamw; adamw8bit (bitsandbytes, CUDA: a quarter of AdamW's state memory); "
        "adafactor (factored state, in transformers); prodigy (prodigyopt, adapts "
        "the step size).",
        choices=OPTIMIZER_CHOICES,
    )
    lr_schedule: str = _opt("constant", "Learning-rate schedule after warmup.", choices=LR_SCHEDULE_CHOICES)
    warmup_steps: int = _opt(0, "Steps of linear learning-rate warmup.", bounds=(0, 100_000))
    weight_decay: float = _opt(1e-2, "Weight decay on the LoRA weights.", bounds=(0, 10))
    max_grad_norm: float = _opt(1.0, "Gradient clipping norm (0 disables).", bounds=(0, 1e4))
    mixed_precision: str = _opt(
        "auto", "auto picks bf16/fp16 on a GPU and no on a CPU.", choices=MIXED_PRECISION_CHOICES
    )
    gradient_checkpointing: bool = _opt(False, "Trade compute for memory in the UNet (helps on small GPUs).")
    quantize_base: str = _opt(
        "none",
        "Frozen base weights in int8 or 4-bit NF4 (bitsandbytes, CUDA only; the adapter still trains in "
        "fp32): about a half or a third of bf16's memory, for SD3.5 and Flux.1 on smaller GPUs.",
        choices=QUANTIZE_BASE_CHOICES,
    )
    cpu_threads: int = _opt(
        0,
        "torch threads when training on a CPU; 0: torch's count (every core). Set 1 "
        "when other work shares the CPU: idle threads then spin and slow every step.",
        bounds=(0, 1024),
    )
    seed: int = _opt(
        42, "Seed of noise, timesteps and image order: same seed, same adapter.", bounds=(0, MAX_SEED)
    )
    min_snr_gamma: float = _opt(
        0.0, "Min-SNR loss weighting gamma (5 is common; 0 disables).", bounds=(0, 1000)
    )
    prior_loss_weight: float = _opt(
        1.0,
        "Weight of the regularisation images' loss against the concept's (used only with --reg-images).",
        bounds=(0, 100),
    )
    noise_offset: float = _opt(
        0.0, "Noise offset for darker darks and brighter brights (0.05-0.1; 0 disables).", bounds=(0, 1)
    )
    # The transformer families (SD3.5, Flux.1); UNet models ignore these.
    max_sequence_length: int = _opt(
        77,
        "SD3.5 and Flux.1: tokens of T5 text per caption (77 as diffusers' SD3 script; up to 512). "
        "Longer captions are cut, and the cut is reported.",
        bounds=(1, T5_MAX_TOKENS),
    )
    weighting_scheme: str = _opt(
        "default",
        "SD3.5 and Flux.1: how training draws noise levels: default (the family's own: logit_normal for "
        "SD3.5, uniform for Flux.1), logit_normal, uniform, mode, sigma_sqrt or cosmap (diffusers' names).",
        choices=WEIGHTING_CHOICES,
    )
    guidance: float = _opt(
        FLUX_TRAINING_GUIDANCE,
        "Flux.1 dev: the guidance value its guidance embedding sees in training (3.5, as diffusers' "
        "script); schnell has none.",
        bounds=(0, MAX_GUIDANCE),
    )
    drop_t5: bool = _opt(
        False, "SD3.5: train without the T5 text encoder (its pipeline allows it): less memory, less text."
    )
    checkpoint_every: int = _opt(
        0, "Save a resumable checkpoint every N steps (0: only at the end).", bounds=(0, 100_000)
    )
    checkpoints_to_keep: int = _opt(2, "How many of the newest checkpoints to keep.", bounds=(1, 1000))
    preview_every: int = _opt(
        0,
        "Render preview images every N steps (0 disables; the app starts at preview_interval(steps)).",
        bounds=(0, 100_000),
    )
    preview_prompts: tuple[str, ...] = _opt(
        (),
        "Prompts for previews; default: the first image's caption.",
        max_items=MAX_PREVIEWS,
        max_chars=MAX_PROMPT_CHARS,
    )
    preview_seeds: tuple[int, ...] = _opt(
        (1, 2),
        "Fixed seeds for previews, so images are comparable.",
        bounds=(0, MAX_SEED),
        max_items=MAX_PREVIEWS,
    )
    preview_inference_steps: int = _opt(20, "Denoising steps per preview image.", bounds=(1, 200))
    final_preview: bool = _opt(True, "Render <name>.preview.png beside the adapter when training ends.")
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def validate(self) -> None:
        """Raise ConfigError with an actionable message for the first bad setting."""
        if not self.base_model:
            raise ConfigError("no base model given: pass --base-model (hub id, folder or .safetensors)")
        check_adapter_name(self.name)
        check_fields(self)
        if self.mixed_precision not in MIXED_PRECISION_CHOICES:
            raise ConfigError(f"mixed_precision must be one of {MIXED_PRECISION_CHOICES}")
        if self.optimizer not in OPTIMIZER_CHOICES:
            raise ConfigError(
                f"optimizer must be one of {', '.join(OPTIMIZER_CHOICES)}, got {self.optimizer!r}"
            )
        if self.lr_schedule not in LR_SCHEDULE_CHOICES:
            raise ConfigError(f"lr_schedule must be one of {LR_SCHEDULE_CHOICES}")
        if self.quantize_base not in QUANTIZE_BASE_CHOICES:
            raise ConfigError(
                f"quantize_base must be one of {', '.join(QUANTIZE_BASE_CHOICES)}, got {self.quantize_base!r}"
            )
        if self.quantize_base != "none" and self.mixed_precision not in ("auto", "bf16"):
            # bitsandbytes' layers hand bf16 to the unquantized ones: only bf16 autocast keeps dtypes together
            raise ConfigError(
                f"quantize_base={self.quantize_base} computes in bf16: use mixed_precision auto or bf16 "
                f"(not {self.mixed_precision})"
            )
        if self.weighting_scheme not in WEIGHTING_CHOICES:
            raise ConfigError(
                f"weighting_scheme must be one of {', '.join(WEIGHTING_CHOICES)}, got {self.weighting_scheme!r}"
            )
        self.data.validate()
        self.lora.validate()
        self.validation.validate()

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with top-level fields changed (dataclasses.replace)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from a nested dict; unknown or misspelt keys raise ConfigError."""
        return _build(cls, values, source)

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        """Read a .json or .toml config file strictly."""
        return cls.from_dict(read_config_file(path), source=str(path))


# The sections of a TrainConfig: their fields' names are unique across sections, so a flag, a widget
# or an API parameter can name a field by its own name alone.
SECTIONS: dict[str, type] = {"data": DataConfig, "lora": LoraSpec, "validation": ValidationConfig}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a JSON or TOML file into a dict, with errors that name the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        values = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(
            f"config file {path} is not valid {path.suffix.lstrip('.') or 'JSON'}: {exc}"
        ) from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a table/object of settings")
    return values


def read_settings(
    values: dict[str, Any], source: str = "settings", cls: type | None = None
) -> dict[str, Any]:
    """Partial settings -> nested, typed settings, read strictly: a misspelt key or a wrong type is refused.

    Keys are field names, nested tables (`{"lora": {"rank": 8}}`) or field paths (`{"lora.rank": 8}`);
    config files, presets, settings objects and flags are all read here.
    """
    cls = cls or TrainConfig
    values = _nest(values, source)
    known = field_help(cls)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(
            f"{source}: unknown setting(s) {', '.join(unknown)} for {cls.__name__}; known: {', '.join(known)}"
        )
    out: dict[str, Any] = {}
    for name, value in values.items():
        default = known[name]["default"]
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {name} must be a table of settings")
            out[name] = read_settings(value, f"{source}.{name}", type(default))
        else:
            out[name] = _coerce(value, default, f"{source}: {name}")
    return out


def merge_settings(*layers: dict[str, Any]) -> dict[str, Any]:
    """Nested settings laid over each other: a later layer wins, field by field inside each section."""
    out: dict[str, Any] = {}
    for layer in layers:
        for name, value in layer.items():
            if isinstance(value, dict) and isinstance(out.get(name), dict):
                out[name] = merge_settings(out[name], value)
            else:
                out[name] = value
    return out


def _nest(values: dict[str, Any], source: str) -> dict[str, Any]:
    """Field paths ("lora.rank") -> nested tables, merged with any table given for the same section."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source} must be a table of settings, got {values!r}")
    out: dict[str, Any] = {}
    for key, value in values.items():
        section, _, name = str(key).partition(".")
        if name:
            table = out.setdefault(section, {})
            if not isinstance(table, dict):
                raise ConfigError(f"{source}: {section} must be a table of settings")
            table[name] = value
        elif isinstance(value, dict):
            out[key] = {**out.get(key, {}), **value} if isinstance(out.get(key), dict) else dict(value)
        else:
            out[key] = value
    return out


def _build(cls: type, values: dict[str, Any], source: str) -> Any:
    return _construct(cls, read_settings(values, source, cls))


def _construct(cls: type, settings: dict[str, Any]) -> Any:
    defaults = {name: info["default"] for name, info in field_help(cls).items()}
    return cls(
        **{
            name: _construct(type(defaults[name]), value)
            if dataclasses.is_dataclass(defaults[name])
            else value
            for name, value in settings.items()
        }
    )


def _coerce(value: Any, default: Any, where: str) -> Any:
    """Check a value from a file against its default's type; ints are accepted for floats."""
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {_shown_value(value)}")
        return tuple(value)
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        # An int beyond a float's range stays an int: the field's bounds then refuse it by name.
        value = float(value) if ok and abs(value) < 2**1023 else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"{where} must be {type(default).__name__}, got {_shown_value(value)}")
    return value


def _shown_value(value: Any) -> str:
    """A value for a one-line message: its repr, cut short."""
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def field_help(cls: type) -> dict[str, dict[str, Any]]:
    """Per-field metadata (help, flag, choices) and default (MISSING: required), for generating a CLI or UI."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING or f.default_factory is dataclasses.MISSING:
            default = f.default
        else:
            default = f.default_factory()
        out[f.name] = {"type": f.type, "default": default, **f.metadata}
    return out


@dataclass(frozen=True)
class AdapterWeight:
    """One adapter of a mix and its weight; a non-finite or out-of-range weight is refused when made."""

    name: str
    weight: float = 1.0
    # A weight per block, as the LoRA Block Weight extension writes it: a preset (OUTALL) or a list
    # (1,0,0,...); read against the base model's family when drawn (sdlora.library.tools.block_weights).
    block_weights: str = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)):
            raise ConfigError(f"weight of adapter {self.name!r} must be a number, got {self.weight!r}")
        if not (math.isfinite(self.weight) and abs(self.weight) <= MAX_ADAPTER_WEIGHT):
            raise ConfigError(
                f"weight of adapter {self.name!r} must be a number between "
                f"-{MAX_ADAPTER_WEIGHT:g} and {MAX_ADAPTER_WEIGHT:g}, got {self.weight!r}"
            )
        if not isinstance(self.block_weights, str) or len(self.block_weights) > MAX_BLOCK_WEIGHTS_CHARS:
            raise ConfigError(
                f"block weights of adapter {self.name!r} must be a preset name or a list of at most "
                f"{MAX_BLOCK_WEIGHTS_CHARS} characters, got {str(self.block_weights)[:40]!r}"
            )


@dataclass(frozen=True)
class GenerateConfig:
    """What to draw. Sizes of 0 mean the base model's native resolution; seed -1 picks one at random."""

    prompt: str = _opt(
        dataclasses.MISSING, "The prompt; <lora:name:weight> tags also work.", max_chars=MAX_PROMPT_CHARS
    )
    negative_prompt: str = _opt("", "What the image should not show.", max_chars=MAX_PROMPT_CHARS)
    seed: int = _opt(
        -1,
        "Seed of the first image (the next ones use seed+1, ...); -1 picks one at random.",
        bounds=(-1, MAX_SEED - 16),  # room for seed+1, ... of the largest count
    )
    steps: int = _opt(20, "Denoising steps per image.", bounds=(1, 200))
    guidance: float = _opt(
        7.5,
        "Classifier-free guidance scale: how closely the image follows the prompt.",
        bounds=(0, MAX_GUIDANCE),
    )
    width: int = _opt(
        0, "Image width in pixels, a multiple of 8; 0: the model's native size.", bounds=(0, MAX_PIXELS // 8)
    )
    height: int = _opt(
        0, "Image height in pixels, a multiple of 8; 0: the model's native size.", bounds=(0, MAX_PIXELS // 8)
    )
    scheduler: str = _opt(
        MODEL_SAMPLER,
        "Sampler; auto: the base model's own (Euler a on SD 1.x/2.x/XL, Euler on SD3.5 and Flux.1).",
        choices=(MODEL_SAMPLER, *SCHEDULERS),
    )
    adapters: tuple[AdapterWeight, ...] = _opt(
        (), "Library adapters, each at its weight (negative allowed).", flag="--lora"
    )
    count: int = _opt(1, "How many images, at seeds seed, seed+1, ...", bounds=(1, 16))

    def validate(self, native_resolution: int | None = None) -> None:
        """Raise ConfigError for the first bad setting; sizes are checked against the native side when given."""
        if self.scheduler not in (MODEL_SAMPLER, *SCHEDULERS):
            choices = ", ".join((MODEL_SAMPLER, *SCHEDULERS))
            raise ConfigError(f"unknown scheduler {self.scheduler!r}; choose one of {choices}")
        check_fields(self)
        for side in (self.width, self.height):
            if side and (side < 8 or side % 8):
                raise ConfigError(f"width and height must be multiples of 8, got {side}")
        width, height = self.width or native_resolution or 0, self.height or native_resolution or 0
        check_image_size(width, height, native_resolution)
        for adapter in self.adapters:
            adapter.validate()
