"""Real-size training steps: `python bench/real_size.py [--device cuda|cpu] [--models ...] [--budget-s 480]`.

UNets (SD 1.5, SDXL) and transformers (SD3.5 Medium and Large, Flux.1 dev) are built from the configs in
sdlora/models/configs with random weights (nothing is downloaded). Latents and text conditioning are random
stand-ins for the cache, so a step is what a cached run does each step. Each row, side by side:
- loop: sdlora's own optimizer step (`sdlora.training.step.optimizer_step` over a `Run`: batch from the
  cache, noising, accelerate, clipping, schedule, the loss read back);
- floor: the least a step can cost: the same denoiser forward and backward through the LoRA on inputs
  noised once beforehand, the same optimizer object's step and the same zeroing, nothing else;
then loop / floor (>= 1 up to noise), peak memory and the estimate (sdlora/training/estimate.py) beside it.
GPU: the transformers at 1024 px, batch 1, rank 16, bf16, with the frozen base in bf16, int8 or NF4
(bitsandbytes layers put in place of the Linear layers, as diffusers' loader makes them), with and without
gradient checkpointing; s/step, peak memory (torch), MFU from parameter and token counts (frozen base: a
step is 4 x parameters x tokens FLOPs, forward and input gradients; attention's own FLOPs left out) against
the card's dense bf16 peak; the UNets at 512/1024 px. Rows run until --budget-s, the rest are listed as left.
CPU: reduced sizes (the real width, fewer blocks, 128 px; the UNets at 1/8 of their side), each row in its own
process so its peak resident memory (less the process's size before the model) is its own.
Writes its section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import machine, write_section  # noqa: E402
from sdlora.config import DataConfig, LoraSpec, TrainConfig  # noqa: E402
from sdlora.models.families import family_named  # noqa: E402
from sdlora.training.encode import EncodedConcepts  # noqa: E402
from sdlora.training.estimate import (  # noqa: E402
    TransformerSize,
    position_grid,
    transformer_memory,
    transformer_size,
)
from sdlora.training.lora import add_lora, trainable_parameters  # noqa: E402
from sdlora.training.optimizers import make_optimizer  # noqa: E402
from sdlora.training.step import Run, optimizer_step  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "sdlora" / "models" / "configs"
# name: (family, config folder, native px, CPU blocks kept: joint/double, single)
MODELS = {
    "SD3.5 Medium": ("sd3", "stable-diffusion-3.5-medium", 1024, (2, 0)),
    "SD3.5 Large": ("sd3", "stable-diffusion-3.5-large", 1024, (2, 0)),
    "Flux.1 dev": ("flux", "flux-1-dev", 1024, (1, 1)),
    "SD 1.5": ("sd1", "stable-diffusion-v1", 512, None),
    "SDXL": ("sdxl", "stable-diffusion-xl-v1-base", 1024, None),
}
FLUX_SCHEDULER = dict(
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense, SXM; H100 PCIe: 756
CPU_PX = 128


# -- models -------------------------------------------------------------------------------


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Build weights directly in `dtype` (Flux.1 in float32 first would need 48 GB)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def build(name: str, device: torch.device, dtype: torch.dtype, reduced: bool):
    """The denoiser from its shipped config with random weights (fewer blocks when `reduced`)."""
    import diffusers

    family, folder, _, kept = MODELS[name]
    part = "unet" if kept is None else "transformer"
    config = json.loads((CONFIGS / folder / part / "config.json").read_text())
    model_class = getattr(diffusers, config.pop("_class_name", "UNet2DConditionModel"))
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    if reduced and kept is not None:
        config["num_layers"] = kept[0]
        if "num_single_layers" in config:
            config["num_single_layers"] = kept[1]
        if "dual_attention_layers" in config:
            config["dual_attention_layers"] = [i for i in config["dual_attention_layers"] if i < kept[0]]
    with default_dtype(dtype), torch.device(device):
        model = model_class.from_config(config)
    model.requires_grad_(False)
    return model, config


def quantize(model, kind: str, device: torch.device):
    """Every Linear layer of the blocks made a bitsandbytes int8 / NF4 layer on the GPU, as diffusers'
    BitsAndBytesConfig loader makes them (it needs weights on disk; these are random)."""
    import bitsandbytes as bnb

    blocks = [m for n, m in model.named_children() if n.endswith("blocks")]
    for block in (b for blocks_ in blocks for b in blocks_):
        for name, linear in [(n, m) for n, m in block.named_modules() if type(m) is torch.nn.Linear]:
            weight = linear.weight.detach().cpu()
            if kind == "int8":
                layer = bnb.nn.Linear8bitLt(  # diffusers' BitsAndBytesConfig default outlier threshold
                    linear.in_features,
                    linear.out_features,
                    linear.bias is not None,
                    has_fp16_weights=False,
                    threshold=6.0,
                )
                layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
            else:
                layer = bnb.nn.Linear4bit(
                    linear.in_features,
                    linear.out_features,
                    linear.bias is not None,
                    compute_dtype=torch.bfloat16,
                    quant_type="nf4",
                )
                layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
            if linear.bias is not None:
                layer.bias = torch.nn.Parameter(linear.bias.detach(), requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, child, layer.to(device))
    setattr(model, f"is_loaded_in_{'8bit' if kind == 'int8' else '4bit'}", True)  # peft reads it
    torch.cuda.empty_cache()
    return model


def cache(name: str, model, pixels: int, text_tokens: int) -> EncodedConcepts:
    """Random stand-ins for cached latents and text conditioning, shaped as the real ones."""
    g = torch.Generator().manual_seed(0)
    family, config = MODELS[name][0], model.config
    side = pixels // 8
    if family in ("sd3", "flux"):
        latents = [torch.randn(16, side, side, generator=g)]
        embeddings = torch.randn(1, text_tokens, config.joint_attention_dim, generator=g)
        pooled = torch.randn(1, config.pooled_projection_dim, generator=g)
        return EncodedConcepts(latents, embeddings, [f"{pixels}x{pixels}"], {"pooled": pooled})
    latents = [torch.randn(4, side, side, generator=g)]
    embeddings = torch.randn(1, 77, config.cross_attention_dim, generator=g)
    if config.addition_embed_type != "text_time":
        return EncodedConcepts(latents, embeddings, [f"{pixels}x{pixels}"])
    extras = {
        "pooled": torch.randn(1, 1280, generator=g),
        "time_ids": torch.tensor([[pixels, pixels, 0, 0, pixels, pixels]], dtype=torch.float32),
    }
    return EncodedConcepts(latents, embeddings, [f"{pixels}x{pixels}"], extras)


def objective_for(name: str):
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    family = family_named(MODELS[name][0])
    if family.name == "flux":
        return family, family.objective(FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER).config, "flow")
    if family.name == "sd3":
        return family, family.objective(FlowMatchEulerDiscreteScheduler(shift=3.0).config, "flow")
    return family, family.objective(DDPMScheduler(num_train_timesteps=1000).config, "epsilon")


# -- one row ------------------------------------------------------------------------------


def measure(row: dict, device: torch.device, steps: int, model=None) -> dict:
    """Loop and floor seconds per step, peak memory and the estimate for one setting."""
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    name, pixels, quantized = row["model"], row["px"], row["quantize"]
    cuda = device.type == "cuda"
    family, objective = objective_for(name)
    if model is None:
        model, _ = build(name, device, torch.bfloat16 if cuda else torch.float32, reduced=not cuda)
        model.bench_parameters = sum(p.numel() for p in model.parameters())  # before packing into 4/8 bits
        if quantized != "none":
            model = quantize(model, quantized, device)
        add_lora(model, LoraSpec(rank=row["rank"], alpha=row["rank"]), family.lora_targets, seed=0)
    config = TrainConfig(
        base_model=name,
        steps=10_000,
        optimizer=row["optimizer"],
        gradient_checkpointing=row["checkpointing"],
        quantize_base=quantized,
        data=DataConfig(images="-", resolution=pixels),
        lora=LoraSpec(rank=row["rank"], alpha=row["rank"]),
    )
    if row["checkpointing"]:
        model.enable_gradient_checkpointing()
    else:
        model.disable_gradient_checkpointing()
    accelerator = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no")
    optimizer = make_optimizer(config, trainable_parameters(model))
    schedule = get_scheduler("constant", optimizer=optimizer)
    denoiser, optimizer, schedule = accelerator.prepare(model, optimizer, schedule)
    encoded = cache(name, model, pixels, family.estimate_text_tokens)
    run = Run(config, accelerator, denoiser, optimizer, schedule, objective, encoded, None)
    denoiser.train()
    batch = encoded.batch(torch.tensor([0]), accelerator.device)
    noised = objective.noised(batch.latents, torch.Generator().manual_seed(0))
    bare_optimizer = optimizer.optimizer  # the loop's own optimizer object, without accelerate's wrapper

    def loop_step(i: int) -> None:
        optimizer_step(run, i)

    def floor_step(i: int) -> None:
        with accelerator.autocast():
            prediction = objective.predict(denoiser, noised, batch)
        torch.nn.functional.mse_loss(prediction.float(), noised.target.float()).backward()
        bare_optimizer.step()
        bare_optimizer.zero_grad(set_to_none=True)

    def timed(fn, i: int) -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(i)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(3 if cuda else 1):
        loop_step(i)
        floor_step(i)
    loop, floor = [], []
    for i in range(steps):  # interleaved, each first in turn, so both see the same machine
        pair = (loop_step, floor_step) if i % 2 == 0 else (floor_step, loop_step)
        seconds = {fn: timed(fn, i) for fn in pair}
        loop.append(seconds[loop_step])
        floor.append(seconds[floor_step])
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else held_gib(model, bare_optimizer, floor_step)
    lora_parameters = sum(p.numel() for p in trainable_parameters(model))
    return {
        **row,
        "loop_s": statistics.median(loop),
        "floor_s": statistics.median(floor),
        "peak_gib": peak,
        "estimate_gib": _estimate(name, model, config, lora_parameters // row["rank"], cuda),
        "parameters": model.bench_parameters,
        "tokens": (pixels // 16) ** 2 + family.estimate_text_tokens if family.estimate_variants else None,
        "_model": model,
    }


def held_gib(model, optimizer, step) -> float:
    """CPU: the tensors a step holds at its peak, counted, not the process's resident size: weights and
    buffers, optimizer state, the adapter's gradients, and what autograd saves for the backward pass."""
    tensors = [*model.parameters(), *model.buffers()]
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    state = sum(t.nbytes for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    grads = sum(p.numel() * 4 for p in trainable_parameters(model))
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in held:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(0)
    return (sum(held.values()) + state + grads + sum(saved.values())) / 2**30


def _estimate(name: str, model, config: TrainConfig, lora_per_rank: int, cuda: bool) -> float | None:
    """The estimate's training peak for this very model (its blocks; float32 on a CPU), in GiB."""
    family = family_named(MODELS[name][0])
    if not family.estimate_variants:
        return None
    width = transformer_size(family, model.bench_parameters).width
    blocks = model.config.num_layers + getattr(model.config, "num_single_layers", 0)
    buffers = position_grid(dict(model.config))
    size = TransformerSize(family, model.bench_parameters, width, blocks, lora_per_rank, buffers)
    gb = transformer_memory(config, size, float32=not cuda)["training"]
    return gb * 1e9 / 2**30


# -- the runs -----------------------------------------------------------------------------


def gpu_rows(models: list[str]):
    """Most telling first: Flux.1 in 16 GB and its MFU, then SD3.5, then the UNets."""
    settings = {
        "Flux.1 dev": [("nf4", True), ("none", False), ("none", True), ("int8", True), ("nf4", False)],
        "SD3.5 Medium": [("none", False), ("none", True), ("nf4", True)],
        "SD3.5 Large": [("none", True), ("nf4", True), ("none", False)],
        "SD 1.5": [("none", False), ("none", True)],
        "SDXL": [("none", False), ("none", True)],
    }
    for name in [m for m in settings if m in models]:
        rank = 32 if MODELS[name][3] is None else 16
        for quantized, checkpointing in settings[name]:
            yield dict(
                model=name,
                px=MODELS[name][2],
                rank=rank,
                quantize=quantized,
                checkpointing=checkpointing,
                optimizer="adamw",
            )


def cpu_rows(models: list[str]):
    for name in models:
        kept = MODELS[name][3]
        px = CPU_PX if kept is not None else max(64, MODELS[name][2] // 8 // 64 * 64)
        rank = 32 if kept is None else 16
        yield dict(model=name, px=px, rank=rank, quantize="none", checkpointing=False, optimizer="adamw")


def run_gpu(models: list[str], steps: int, budget_s: float) -> tuple[list[dict], list[dict]]:
    device = torch.device("cuda")
    started, rows, left = time.time(), [], []
    held: tuple | None = None  # the model built for the last (name, quantize): reused across checkpointing
    for row in gpu_rows(models):
        if time.time() - started > budget_s:
            left.append(row)
            continue
        key = (row["model"], row["quantize"])
        model = held[1] if held and held[0] == key else None
        if model is None:
            held = None
            torch.cuda.empty_cache()
        try:
            result = measure(row, device, steps, model)
        except torch.cuda.OutOfMemoryError:
            result = {**row, "error": "out of memory"}
            held = None
            torch.cuda.empty_cache()
        else:
            held = (key, result.pop("_model"))
        rows.append(result)
        print(json.dumps(result), flush=True)
    return rows, left


def run_cpu(models: list[str], steps: int) -> list[dict]:
    """Each row in its own process: its peak resident memory is then its own."""
    rows = []
    for row in cpu_rows(models):
        out = subprocess.run(
            [sys.executable, __file__, "--row", json.dumps(row), "--steps", str(steps)],
            capture_output=True,
            text=True,
            check=True,
        )
        result = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(result)
        print(json.dumps(result), flush=True)
    return rows


def one_cpu_row(row: dict, steps: int) -> None:
    torch.set_num_threads(1)
    result = measure(row, torch.device("cpu"), steps)
    result.pop("_model")
    result["rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(result))


# -- the report ---------------------------------------------------------------------------


def mfu(row: dict) -> str:
    """Model FLOPs utilisation: 4 x parameters x tokens per step against the card's dense bf16 peak."""
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name and "PCIe" not in name), None)
    if peak is None or not row.get("tokens"):
        return "-"
    return f"{4 * row['parameters'] * row['tokens'] / row['loop_s'] / (peak * 1e12):.0%}"


def table(rows: list[dict], cuda: bool) -> list[str]:
    memory = "peak GPU memory (torch), GiB" if cuda else "tensors held at the peak, GiB"
    lines = [
        f"| model | px | quantized base | checkpointing | loop, s/step | floor, s/step | loop / floor | {memory} "
        f"| estimate, GiB | estimate / measured |{' MFU |' if cuda else ''}",
        "| --- " * (11 if cuda else 10) + "|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['model']} | {r['px']} | {r['quantize']} | {r['checkpointing']} | {r['error']} |"
            )
            continue
        estimate = f"{r['estimate_gib']:.1f}" if r["estimate_gib"] is not None else "-"
        ratio = f"{r['estimate_gib'] / r['peak_gib']:.2f}" if r["estimate_gib"] is not None else "-"
        lines.append(
            f"| {r['model']} | {r['px']} | {r['quantize']} | {'yes' if r['checkpointing'] else 'no'} | "
            f"{r['loop_s']:.3f} | {r['floor_s']:.3f} | {r['loop_s'] / r['floor_s']:.2f}x | {r['peak_gib']:.2f} | "
            f"{estimate} | {ratio} |" + (f" {mfu(r)} |" if cuda else "")
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=None, help="measured steps per row (after warm-up)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="GPU: start no row after this")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # a CPU row, in its own process
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    steps = args.steps or (8 if cuda else 2)
    if args.row:
        return one_cpu_row(json.loads(args.row), steps)
    header = machine()
    rows, left = run_gpu(args.models, steps, args.budget_s) if cuda else (run_cpu(args.models, steps), [])
    if args.json:
        clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
        Path(args.json).write_text(json.dumps({"machine": header, "rows": clean, "left": left}, indent=2))
    text = "\n".join(report(rows, left, cuda, steps, header))
    print(text)
    if not args.no_write:
        section = "real_size_cuda" if cuda else "real_size_cpu"
        print(f"written to {write_section(section, text)}")


def report(rows: list[dict], left: list[dict], cuda: bool, steps: int, header: str) -> list[str]:
    where = (
        "CUDA (`python bench/real_size.py` on a GPU)"
        if cuda
        else "CPU (`python bench/real_size.py --device cpu`)"
    )
    lines = [
        f"## Real-size training steps, {where}",
        "",
        f"{header}; denoisers built from sdlora/models/configs with random weights, LoRA on the family's "
        "attention projections (rank 16 on the transformers, 32 on the UNets), batch 1, AdamW, cached latents "
        f"and text conditioning, {steps} steps each after warm-up, medians; frozen weights "
        f"{'bf16 (or int8/NF4 where quantized), bf16 autocast' if cuda else 'float32'}. The floor is the same "
        "forward and backward and the same optimizer step and zeroing with nothing else (inputs noised once "
        "beforehand), so loop / floor is the loop's own overhead. The estimate is "
        "sdlora/training/estimate.py's training peak for the very model measured.",
        "",
        *table(rows, cuda),
    ]
    if left:
        lines += ["", "Left for a further call (budget spent): " + "; ".join(_label(r) for r in left) + "."]
    if not cuda:
        lines += [
            "",
            f"Reduced on this CPU: the transformers at their real width with fewer blocks (SD3.5 Medium: 2 of 24 "
            f"joint blocks, one with its second attention; Large: 2 of 38; Flux.1 dev: 1 of 19 double and 1 of 38 "
            f"single blocks) at {CPU_PX} px with the text tokens of a 77-token T5 cache; the UNets whole at 1/8 of "
            "their side. Memory on a CPU is counted, not read from the allocator: weights and buffers, optimizer "
            "state, the adapter's gradients and the tensors autograd saves for the backward pass (one step, "
            "counted by saved-tensor hooks); the estimate is computed in float32 for these very sizes. "
            "Peak resident sizes of each row's process (imports and model building included): "
            + ", ".join(f"{r['model']} {r['rss_gib']:.1f} GiB" for r in rows if "rss_gib" in r)
            + ".",
        ]
    return lines


def _label(row: dict) -> str:
    return (
        f"{row['model']} {row['quantize']} {'checkpointed' if row['checkpointing'] else 'not checkpointed'}"
    )


if __name__ == "__main__":
    main()
