"""Generation over one resident base model with any mix of library adapters.

Adapters stay loaded in an LRU of `max_resident`. A mix is fused into the weights when it is
first drawn, so it costs nothing per step, and the same request gives the same image whatever
was drawn before: fused from the same base copy in the same order, the weights are the same bits
every time (a mix drawn unfused the first time and fused the next differed by an 8-bit level).
Rows of one batch with different adapters run unfused, through peft. Three pitfalls shape the code: after
`fuse_lora`, unloading does not restore the base unless `unfuse_lora` runs first; unfusing
subtracts what fusing added, which is not exact in floating point (and cannot undo a NaN or
an overflow), so the touched base weights are copied before fusing and put back after; and
loading an adapter changes the active set, so the mix is set after every load.
"""

from __future__ import annotations

import re
import secrets
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin

from sdlora import __version__
from sdlora.config import SCHEDULERS, AdapterWeight, GenerateConfig  # noqa: F401 - re-exported for callers
from sdlora.errors import ConfigError
from sdlora.generation.defaults import (
    SamplingDefaults,
    check_fits_model,
    sampling_defaults,
    with_model_sampler,
)
from sdlora.library.formats import load_into_pipeline
from sdlora.library.store import AdapterLibrary, reference_from_pipeline
from sdlora.library.tools.block_weights import apply_block_weights, block_weights_key, parse_block_weights
from sdlora.models.families import family_of_pipeline
from sdlora.models.loading import ModelInfo, inspect_pipeline, load_pipeline

BASE_ROW = "__base__"  # peft's adapter name for a row that runs without adapters
LORA_TAG = re.compile(r"<lora:([^:>]+)((?::[^:>]*)*)>")  # name, then :weight, :lbw=... (the extension's)
NUMBER = re.compile(r"[-+]?[0-9]*\.?[0-9]+")
BLOCK_WEIGHTS = ":lbw="  # joins an adapter's name and its block weights in a mix key (names hold no ':')


@dataclass(frozen=True)
class GeneratedImage:
    image: Image.Image = field(repr=False)
    seed: int
    parameters: str  # AUTOMATIC1111's 'parameters' text, also stored in the PNG

    def save(self, path: str | Path) -> Path:
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", self.parameters)
        self.image.save(path, pnginfo=info)
        return Path(path)


def parse_prompt(prompt: str) -> tuple[str, tuple[AdapterWeight, ...]]:
    """Strip AUTOMATIC1111 `<lora:name:weight>` tags (with the LoRA Block Weight extension's `:lbw=...`)
    from a prompt and return them as adapter weights."""
    found = tuple(_tag(m.group(0), m.group(1).strip(), m.group(2)) for m in LORA_TAG.finditer(prompt))
    return " ".join(LORA_TAG.sub(" ", prompt).split()), found


def _tag(tag: str, name: str, items: str) -> AdapterWeight:
    weight, block_weights = 1.0, ""
    for i, item in enumerate(items.split(":")[1:]):
        item = item.strip()
        if item.lower().startswith("lbw="):
            block_weights = item[4:].strip()
        elif i == 0 and NUMBER.fullmatch(item):
            weight = float(item)
        else:
            raise ConfigError(
                f"{tag[:80]}: {item[:40]!r} is not read here; write <lora:name:weight> or "
                "<lora:name:weight:lbw=PRESET_OR_WEIGHTS>"
            )
    return AdapterWeight(name, weight, block_weights)


def resolve_mix(config: GenerateConfig) -> tuple[str, tuple[AdapterWeight, ...]]:
    """Prompt without tags, and the adapter mix: listed adapters, then prompt tags (which win)."""
    prompt, tagged = parse_prompt(config.prompt)
    mix = {a.name: a for a in config.adapters}
    mix.update({a.name: a for a in tagged})
    return prompt, tuple(mix.values())


def mix_key(mix: tuple[AdapterWeight, ...]) -> tuple[tuple[str, float], ...]:
    """A mix as (adapter, weight) pairs without the adapters at weight 0: equal keys draw equal images.

    An adapter with block weights is its own adapter here (`name:lbw=...`): the resident copy with
    them applied, fused and cached like any other. Sorted, so that a mix listed in another order is
    fused in the same order, to the same bits.
    """
    return tuple(sorted((resident_key(a), float(a.weight)) for a in mix if a.weight != 0))


def resident_key(adapter: AdapterWeight) -> str:
    """The name of the adapter as loaded: its library name, with its block weights when it has some."""
    if not adapter.block_weights.strip():
        return adapter.name
    return f"{adapter.name}{BLOCK_WEIGHTS}{block_weights_key(adapter.block_weights)}"


def batch_key(config: GenerateConfig) -> tuple:
    """What requests must share to run in one pipeline call (their prompts, seeds, counts and mixes may differ)."""
    # An empty negative prompt is None to the pipeline, which SDXL encodes as zeros, not as "".
    return (
        config.width,
        config.height,
        config.steps,
        config.guidance,
        config.scheduler,
        bool(config.negative_prompt),
    )


def make_scheduler(name: str, base_config):
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
    )

    classes = {
        "Euler a": EulerAncestralDiscreteScheduler,
        "DPM++ 2M": DPMSolverMultistepScheduler,
        "DDIM": DDIMScheduler,
        "Euler": EulerDiscreteScheduler,
    }
    return classes[name].from_config(base_config)


class Generator:
    """One base model in memory; adapters loaded on demand and kept in an LRU."""

    def __init__(
        self,
        base_model: str,
        library: AdapterLibrary,
        max_resident: int = 8,
        device: str | None = None,
        fuse_mixes: bool = True,
        max_batch_pixels: int = 8 * 512 * 512,
    ) -> None:
        self.base_model = base_model
        self.max_batch_pixels = max_batch_pixels  # images x pixels per pipeline call: bounds its memory
        self.library = library
        self.max_resident = max(1, max_resident)
        self.fuse_mixes = fuse_mixes  # False: every mix runs through the LoRA layers (for comparisons)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._pipeline = None
        self._resident: OrderedDict[str, tuple[str, float]] = OrderedDict()  # name -> (peft name, file mtime)
        self._fused: tuple[tuple[str, float], ...] | None = None
        self._bypassed: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []
        self._saved_base: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        self._lock = threading.RLock()
        self._counter = 0

    @property
    def pipeline(self):
        with self._lock:
            if self._pipeline is None:
                self._pipeline = self._load()
            return self._pipeline

    def _load(self):
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        pipeline = load_pipeline(self.base_model, torch_dtype=dtype).to(self.device)
        if pipeline.vae.dtype != torch.float32:
            pipeline.vae.to(dtype=torch.float32)  # a half-precision VAE overflows: black images
        pipeline.set_progress_bar_config(disable=True)
        self.library.reference = reference_from_pipeline(pipeline)
        return pipeline

    @property
    def family(self) -> str:
        """The base model's family, as block weights are read for it."""
        return self.model_info.family

    @property
    def model_info(self) -> ModelInfo:
        return inspect_pipeline(self.pipeline)

    @property
    def sampling_defaults(self) -> SamplingDefaults:
        """Steps, guidance and samplers for the loaded model: its family's, else GenerateConfig's."""
        family = family_of_pipeline(self.pipeline)
        return sampling_defaults(family, dict(getattr(self.pipeline, family.denoiser).config))

    @property
    def resident(self) -> list[str]:
        return list(self._resident)

    def generate(self, config: GenerateConfig) -> list[GeneratedImage]:
        """Images for a prompt and adapter mix; each carries the parameters that made it."""
        return self.generate_batch([config])[0]

    def generate_batch(self, configs: list[GenerateConfig]) -> list[list[GeneratedImage]]:
        """Images for several requests in shared pipeline calls, each row with its own seed's noise.

        The requests must agree on `batch_key`; their mixes must be equal, or each at most one
        adapter (peft then runs every row with its own adapter, unfused).
        """
        info = self.model_info
        configs = [with_model_sampler(config, self.sampling_defaults) for config in configs]
        for config in configs:
            config.validate(native_resolution=info.resolution)
            check_fits_model(config, self.sampling_defaults, info.model_family.words)
        if len({batch_key(c) for c in configs}) != 1:
            raise ValueError("generate_batch takes requests with one batch_key")
        resolved = [resolve_mix(c) for c in configs]
        for _, mix in resolved:  # a bad preset or count is refused before anything is drawn
            for adapter in mix:
                if adapter.block_weights.strip():
                    parse_block_weights(adapter.block_weights, self.family)
        mixes = [mix_key(mix) for _, mix in resolved]
        config = configs[0]
        with self._lock:
            pipeline = self.pipeline
            row_adapters = None
            if len(set(mixes)) == 1:
                self.apply_mix(resolved[0][1])
            else:
                row_adapters = self._apply_per_row(mixes)
            width, height = config.width or info.resolution, config.height or info.resolution
            if not info.model_family.own_scheduler_only:  # SD3.5, Flux.1: their flow-matching sampler
                pipeline.scheduler = make_scheduler(config.scheduler, pipeline.scheduler.config)
            rows = []  # (request, prompt, negative prompt, seed): one image each
            for i, (request, (prompt, _)) in enumerate(zip(configs, resolved, strict=True)):
                first = request.seed if request.seed >= 0 else secrets.randbelow(2**32 - 16)
                rows += [(i, prompt, request.negative_prompt, s) for s in range(first, first + request.count)]
            per_call = max(1, self.max_batch_pixels // (width * height))
            images = []
            for start in range(0, len(rows), per_call):
                chunk = rows[start : start + per_call]
                adapters = [row_adapters[i] for i, *_ in chunk] if row_adapters else None
                images += self._draw(chunk, config, width, height, adapters)
        results: list[list[GeneratedImage]] = [[] for _ in configs]
        for (i, prompt, _, seed), image in zip(rows, images, strict=True):
            parameters = self._parameters(configs[i], resolved[i][1], prompt, seed, width, height)
            results[i].append(GeneratedImage(image, seed, parameters))
        return results

    @torch.no_grad()
    def _draw(
        self, rows: list, config: GenerateConfig, width: int, height: int, adapters: list[str] | None
    ) -> list[Image.Image]:
        pipeline = self.pipeline
        # One generator per row: row i's noise is what a call for its seed alone would draw.
        generators = [torch.Generator(device="cpu").manual_seed(seed) for *_, seed in rows]
        negatives = [negative for _, _, negative, _ in rows]
        with per_row_adapters(pipeline, adapters):
            latents = pipeline(
                [prompt for _, prompt, _, _ in rows],
                negative_prompt=negatives if any(negatives) else None,
                width=width,
                height=height,
                num_inference_steps=config.steps,
                guidance_scale=config.guidance,
                generator=generators,
                output_type="latent",
            ).images
        vae = pipeline.vae
        family = family_of_pipeline(pipeline)
        decoded = vae.decode(family.latents_for_vae(pipeline, latents, height, width)).sample
        return pipeline.image_processor.postprocess(decoded, output_type="pil")

    def apply_mix(self, mix: tuple[AdapterWeight, ...]) -> None:
        """Make `mix` the active adapters: loaded, weighted, and fused (unless `fuse_mixes` is off)."""
        wanted = mix_key(mix)
        pipeline = self.pipeline
        if wanted == self._fused:
            return
        self._unfuse()
        for name, _ in wanted:
            self._ensure_loaded(name, keep={n for n, _ in wanted})
        if not wanted:
            if self._resident:
                pipeline.disable_lora()
        else:
            pipeline.enable_lora()
            pipeline.set_adapters([self._resident[n][0] for n, _ in wanted], [w for _, w in wanted])
            if self.fuse_mixes:
                peft_names = [self._resident[n][0] for n, _ in wanted]
                self._saved_base = snapshot_base_weights(pipeline, set(peft_names))
                # Set first: should fusing fail half-way, _unfuse still puts the copy back.
                self._fused = wanted
                pipeline.fuse_lora(adapter_names=peft_names, lora_scale=1.0)
                self._bypassed = bypass_lora_wrappers(
                    getattr(pipeline, family_of_pipeline(pipeline).denoiser)
                )

    def _apply_per_row(self, mixes: list[tuple[tuple[str, float], ...]]) -> list[str]:
        """Load and weight every row's one adapter, unfused; returns peft's adapter name for each row."""
        weights = {mix[0][0]: mix[0][1] for mix in mixes if mix}
        if any(len(mix) > 1 or (mix and weights[mix[0][0]] != mix[0][1]) for mix in mixes):
            raise ValueError("rows with their own adapters need one adapter each, at one weight per adapter")
        self._unfuse()
        for name in weights:
            self._ensure_loaded(name, keep=set(weights))
        pipeline = self.pipeline
        if weights:
            pipeline.enable_lora()
            pipeline.set_adapters([self._resident[n][0] for n in weights], list(weights.values()))
        return [self._resident[mix[0][0]][0] if mix else BASE_ROW for mix in mixes]

    def _unfuse(self) -> None:
        """Put the LoRA layers back, and the base weights as they were before fusing, bit for bit."""
        if self._fused is None:
            return
        restore_lora_wrappers(self._bypassed)
        self._bypassed = []
        self._pipeline.unfuse_lora()  # resets peft's merged state; the weights come from the copy
        with torch.no_grad():
            for parameter, copy in self._saved_base:
                parameter.data = copy  # the copy itself: a merge may have replaced the tensor
        self._saved_base = []
        self._fused = None

    def _ensure_loaded(self, key: str, keep: set[str]) -> None:
        name, _, block_weights = key.partition(BLOCK_WEIGHTS)
        info = self.library.get(name)
        key = info.name + (BLOCK_WEIGHTS + block_weights if block_weights else "")
        current = self._resident.get(key)
        if current is not None and current[1] == info.modified:
            self._resident.move_to_end(key)
            return
        if current is not None:
            self._drop(key)
        while len(self._resident) >= self.max_resident:
            victim = next((n for n in self._resident if n not in keep), None)
            if victim is None:
                break
            self._drop(victim)
        self._counter += 1
        peft_name = f"adapter{self._counter}"  # peft names must not contain dots; library names may
        adapter = self.library.read(info.name)
        if block_weights:
            adapter = apply_block_weights(adapter, parse_block_weights(block_weights, self.family))
            if not adapter.layers:
                raise ConfigError(
                    f"block weights {block_weights} leave no layer of {info.name!r}; leave it out"
                )
        load_into_pipeline(self.pipeline, adapter, peft_name)
        self._resident[key] = (peft_name, info.modified)

    def forget(self, name: str) -> None:
        """Unload an adapter, with every block weighting of it (after a rename or delete, or to make room)."""
        with self._lock:
            for key in [k for k in self._resident if k.partition(BLOCK_WEIGHTS)[0] == name]:
                self._drop(key)

    def _drop(self, key: str) -> None:
        """Unload one resident adapter, restoring base weights first."""
        entry = self._resident.pop(key, None)
        if entry is None or self._pipeline is None:
            return
        self._unfuse()
        self._pipeline.delete_adapters(entry[0])

    def comparison_grid(
        self,
        config: GenerateConfig,
        weights: tuple[float, ...] = (0.0, 0.5, 1.0),
        adapters: tuple[str, ...] = (),
    ) -> Image.Image:
        """One prompt at fixed seeds: columns are weights of one adapter, or base plus each adapter."""
        from sdlora.generation.grid import labelled_grid

        seed = config.seed if config.seed >= 0 else secrets.randbelow(2**32 - 16)
        base = replace(config, seed=seed, adapters=())
        if adapters:
            columns = [("base", base)] + [
                (name, replace(base, adapters=(AdapterWeight(name, 1.0),))) for name in adapters
            ]
        else:
            target = config.adapters[0].name if config.adapters else None
            if target is None:
                raise ConfigError("a weight comparison needs one adapter")
            first = config.adapters[0]  # at each weight, with its block weights
            columns = [
                (f"{target} {w:g}", replace(base, adapters=(replace(first, weight=w),))) for w in weights
            ]
        cells = [[image.image for image in self.generate(cfg)] for _, cfg in columns]
        rows = [f"seed {seed + i}" for i in range(config.count)]
        return labelled_grid(cells, [label for label, _ in columns], rows)

    def _parameters(
        self, config: GenerateConfig, mix, prompt: str, seed: int, width: int, height: int
    ) -> str:
        tags = "".join(
            f" <lora:{a.name}:{a.weight:g}"
            + (f":lbw={a.block_weights.strip()}>" if a.block_weights.strip() else ">")
            for a in mix
        )
        lines = [prompt + tags]
        if config.negative_prompt:
            lines.append(f"Negative prompt: {config.negative_prompt}")
        model = Path(self.base_model).name or self.base_model
        lines.append(
            f"Steps: {config.steps}, Sampler: {config.scheduler}, CFG scale: {config.guidance:g}, "
            f"Seed: {seed}, Size: {width}x{height}, Model: {model}, Version: sdlora {__version__}"
        )
        return "\n".join(lines)


def snapshot_base_weights(pipeline, adapter_names: set[str]) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """Copies of every base weight that fusing these peft adapters would change, to restore bit for bit."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    saved = []
    for part in pipeline._lora_loadable_modules:
        model = getattr(pipeline, part, None)
        if not isinstance(model, torch.nn.Module):
            continue
        for module in model.modules():
            if isinstance(module, BaseTunerLayer) and adapter_names & set(
                module._all_available_adapter_names()
            ):
                for parameter in module.get_base_layer().parameters(recurse=False):
                    saved.append((parameter, parameter.detach().clone()))
    return saved


@contextmanager
def per_row_adapters(pipeline, adapters: list[str] | None):
    """While drawing, each LoRA layer runs row i of its batch with peft adapter `adapters[i]`.

    The pipeline's calls do not pass peft's `adapter_names`, so a hook adds it to each LoRA
    layer's call; a batch of k x len(adapters) rows (guidance puts the unconditioned rows
    first, in the same order) repeats the list k times.
    """
    if adapters is None:
        yield
        return
    from peft.tuners.lora import LoraLayer

    def add_names(module, args, kwargs):
        if not args:
            return None
        kwargs["adapter_names"] = adapters * (args[0].shape[0] // len(adapters))
        return args, kwargs

    handles = [
        module.register_forward_pre_hook(add_names, with_kwargs=True)
        for part in pipeline._lora_loadable_modules
        if isinstance(getattr(pipeline, part, None), torch.nn.Module)
        for module in getattr(pipeline, part).modules()
        if isinstance(module, LoraLayer)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def bypass_lora_wrappers(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """While a mix is fused, point each parent at the merged base layer itself.

    A merged peft layer still runs its own forward (checks, then the base layer); swapping
    it out makes a fused mix cost exactly what the base model costs. Returns what to undo.
    """
    swapped = []
    for parent in list(model.modules()):
        for attr, child in list(parent.named_children()):
            if getattr(child, "merged", False) and hasattr(child, "base_layer"):
                setattr(parent, attr, child.base_layer)
                swapped.append((parent, attr, child))
    return swapped


def restore_lora_wrappers(swapped: list[tuple[torch.nn.Module, str, torch.nn.Module]]) -> None:
    for parent, attr, wrapper in swapped:
        setattr(parent, attr, wrapper)
