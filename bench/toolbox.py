"""The adapter toolbox on real layer shapes, on this CPU: `python bench/toolbox.py [--no-write]`.

One function per row; each row runs in its own process (`--row NAME`), so that its peak memory
is its own. Rows:
- resize: a random rank-32 LoRA on every attention projection of SDXL's UNet (to_q, to_k, to_v,
  to_out.0 of every attention block: shapes from the SDXL config shipped in sdlora/models/configs,
  no weights), float16 as kohya saves it, resized to rank 8 by sdlora.library.tools.resize. Beside
  it, on every 40th of those layers, the same truncation by a full SVD of each layer's ΔW (what
  resize scripts usually do), timed on the same layers for the ratio.
Writes the "Toolbox" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SDXL_UNET = REPO / "sdlora" / "models" / "configs" / "stable-diffusion-xl-v1-base" / "unet"
ATTENTION = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0")
ATTENTION += tuple(name.replace("attn1", "attn2") for name in ATTENTION)


def peak_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def sdxl_attention_shapes() -> dict[str, tuple[int, ...]]:
    """Weight shapes of SDXL's UNet attention projections, from its config on the meta device."""
    import torch
    from diffusers import UNet2DConditionModel

    from sdlora.library.formats import layer_shapes

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SDXL_UNET))
    return {f"unet.{k}": s for k, s in layer_shapes(unet).items() if k.endswith(ATTENTION)}


def random_adapter(shapes: dict[str, tuple[int, ...]], rank: int):
    """A random float16 LoRA of `rank` on these layers, built layer by layer (no large transient)."""
    import torch

    from sdlora.library.formats import Adapter, LoraLayer

    g = torch.Generator().manual_seed(0)
    layers = {
        key: LoraLayer(
            (torch.randn(rank, shape[1], generator=g) * 0.02).half(),
            (torch.randn(shape[0], rank, generator=g) * 0.02).half(),
            float(rank),
        )
        for key, shape in shapes.items()
    }
    return Adapter(layers, {"sdlora.family": "sdxl"})


def full_svd_seconds(adapter, keys: list[str], rank: int) -> float:
    """The same truncation the usual way: a full float32 SVD of each layer's ΔW."""
    import torch

    start = time.process_time()
    for key in keys:
        u, s, vh = torch.linalg.svd(adapter.layers[key].delta(), full_matrices=False)
        _ = (u[:, :rank] * s[:rank]) @ vh[:rank]
    return time.process_time() - start


def row_resize() -> dict:
    """Resize a rank-32 SDXL-attention-shaped adapter to rank 8: seconds, peak memory, file sizes."""
    from sdlora.library.formats import write_adapter
    from sdlora.library.tools.resize import resize

    shapes = sdxl_attention_shapes()
    adapter = random_adapter(shapes, 32)
    before_mb, peak_before = current_mb(), peak_mb()
    start, cpu_start = time.perf_counter(), time.process_time()
    resized, report = resize(adapter, rank=8)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    peak_after = peak_mb()  # a high-water mark: if resize set no new one, its peak is at most the old
    extra = (
        f"{peak_after - before_mb:.0f} MB"
        if peak_after > peak_before
        else f"at most {peak_before - before_mb:.0f} MB"
    )
    folder = Path(tempfile.mkdtemp(prefix="bench-toolbox-"))
    sizes = [
        write_adapter(folder / f"{n}.safetensors", a, "kohya", family="sdxl").stat().st_size / 2**20
        for n, a in (("r32", adapter), ("r8", resized))
    ]
    keys = sorted(shapes)[::40]
    sub_start = time.process_time()
    resize(type(adapter)({k: adapter.layers[k] for k in keys}, adapter.metadata), rank=8)
    factored = time.process_time() - sub_start
    return {
        "operation": f"resize rank 32 -> 8, {len(shapes)} SDXL attention layers (float16)",
        "seconds": f"{seconds:.2f} ({cpu:.2f} s of CPU)",
        "memory": f"{extra} above the {before_mb:.0f} MB process holding the adapter",
        "notes": f"file {sizes[0]:.1f} MB -> {sizes[1]:.1f} MB; {report.retained:.1%} of the norm kept "
        f"(random factors: the spectrum is flat); CPU time on {len(keys)} of the layers: {factored:.2f} s "
        f"here vs {full_svd_seconds(adapter, keys, 8):.2f} s by a full float32 SVD of each ΔW",
    }


ROWS = {"resize": row_resize}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--row", choices=ROWS, help="measure one row in this process and print it as JSON")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave docs/ alone")
    args = parser.parse_args()
    if args.row:
        print(json.dumps(ROWS[args.row]()))
        return
    from bench.report import machine, write_section

    rows = []
    for name in ROWS:
        done = subprocess.run(
            [sys.executable, __file__, "--row", name], capture_output=True, text=True, check=True
        )
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    table = ["| operation | seconds | peak memory | notes |", "| --- | --- | --- | --- |"]
    table += [f"| {r['operation']} | {r['seconds']} | {r['memory']} | {r['notes']} |" for r in rows]
    text = "\n".join(
        [
            "## Toolbox: resize, merge, extract (`python bench/toolbox.py`)",
            "",
            machine(),
            "",
            *table,
            "",
            "Each row runs in its own process, one thread; wall seconds depend on the machine's load "
            "(CPU seconds less so). Peak memory is the process's peak resident memory "
            "above what it held before the operation began (the input adapter included in the latter).",
        ]
    )
    print(text)
    if not args.no_write:
        print(f"written to {write_section('toolbox', text)}")


if __name__ == "__main__":
    main()
