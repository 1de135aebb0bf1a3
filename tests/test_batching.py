"""Concurrent requests drawn together: the same images as one at a time, in fewer pipeline calls."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from sdlora.config import LoraSpec
from sdlora.generation.batching import Batcher, group_requests
from sdlora.generation.generate import AdapterWeight, GenerateConfig, Generator
from sdlora.library.formats import Adapter, write_adapter
from sdlora.library.store import AdapterLibrary
from sdlora.models.loading import load_pipeline
from sdlora.training.lora import add_lora, lora_state_dict


@pytest.fixture(scope="module")
def random_adapters(tmp_path_factory, tiny_model) -> AdapterLibrary:
    """Three random rank-4 LoRAs on the tiny model: enough to change its images, no training needed."""
    folder = tmp_path_factory.mktemp("batching-lib")
    unet = load_pipeline(str(tiny_model)).unet
    add_lora(unet, LoraSpec(rank=4, alpha=4))
    for i in range(3):
        torch.manual_seed(i)
        state = {k: torch.randn_like(v) * 0.3 for k, v in lora_state_dict(unet).items()}
        write_adapter(folder / f"a{i}.safetensors", Adapter.from_peft(state, 4.0), "kohya")
    return AdapterLibrary(folder)


class CountingGenerator(Generator):
    """A real Generator that records how many requests each generate_batch call drew together."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[int] = []

    def generate_batch(self, configs):
        self.calls.append(len(configs))
        return super().generate_batch(configs)


def at_once(batcher: Batcher, configs: list[GenerateConfig]) -> list[np.ndarray]:
    """Send every request from its own thread at the same moment, as a web server's handlers do."""
    results: list = [None] * len(configs)
    start = threading.Barrier(len(configs))

    def send(i: int) -> None:
        start.wait()
        results[i] = batcher.generate(configs[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(configs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [np.asarray(r[0].image, dtype=np.int16) for r in results]


def one_at_a_time(generator: Generator, configs: list[GenerateConfig]) -> list[np.ndarray]:
    return [np.asarray(generator.generate(c)[0].image, dtype=np.int16) for c in configs]


def assert_same_images(batched: list[np.ndarray], single: list[np.ndarray]) -> None:
    """Equal up to float summation order: a batched matmul on the CPU adds in another order, so the
    UNet's outputs differ by ~1e-6 and an 8-bit pixel lying on a rounding boundary can move one level."""
    for a, b in zip(batched, single, strict=True):
        assert np.abs(a - b).max() <= 1
        assert (a == b).mean() > 0.99


def test_same_mix_at_eight_seeds_is_one_call_with_the_one_at_a_time_images(tiny_model, random_adapters):
    generator = CountingGenerator(str(tiny_model), random_adapters, fuse_mixes=False)
    mix = (AdapterWeight("a0", 0.8),)
    configs = [GenerateConfig(prompt="a red circle", seed=seed, steps=3, adapters=mix) for seed in range(8)]
    single = one_at_a_time(generator, configs)
    generator.calls.clear()
    batched = at_once(Batcher(generator, window=0.2), configs)
    assert generator.calls == [8]
    assert_same_images(batched, single)
    assert all(np.abs(batched[0] - b).max() > 8 for b in batched[1:])  # each row drew its own seed's noise


def test_rows_with_different_adapters_share_one_call(tiny_model, random_adapters):
    generator = CountingGenerator(str(tiny_model), random_adapters, fuse_mixes=False)
    mixes = [(), (AdapterWeight("a0", 1.0),), (AdapterWeight("a1", 0.5),), (AdapterWeight("a2", -0.7),)] * 2
    configs = [
        GenerateConfig(prompt=f"circle {i % 3}", seed=i // 4, steps=3, scheduler="DPM++ 2M", adapters=m)
        for i, m in enumerate(mixes)
    ]
    single = one_at_a_time(generator, configs)
    assert np.abs(single[1] - single[0]).max() > 8  # the adapters do change the image at these seeds
    loaded = dict(generator._resident)  # library name -> peft adapter name: a new load would get a new one
    generator.calls.clear()
    batched = at_once(Batcher(generator, window=0.2), configs)
    assert generator.calls == [8]
    assert_same_images(batched, single)
    assert dict(generator._resident) == loaded and len(loaded) == 3  # served from memory, none reloaded
    assert np.array_equal(one_at_a_time(generator, configs[:1])[0], single[0])  # the base is itself again


def test_grouping_keeps_apart_what_one_call_cannot_share():
    one = (AdapterWeight("a", 1.0),)
    configs = [
        GenerateConfig(prompt="x", seed=1, adapters=one),
        GenerateConfig(prompt="y", seed=2, adapters=(AdapterWeight("b", 0.5),)),  # one adapter per row: joins
        GenerateConfig(prompt="x", steps=5, adapters=one),  # other steps
        GenerateConfig(prompt="x", adapters=(AdapterWeight("a", 0.3),)),  # "a" at another weight
        GenerateConfig(prompt="x", adapters=(AdapterWeight("a", 1.0), AdapterWeight("b", 1.0))),  # a real mix
        GenerateConfig(prompt="x", negative_prompt="blur", adapters=one),  # a negative prompt
        GenerateConfig(prompt="x <lora:a:1>", seed=9),  # the same mix, written as a tag
        GenerateConfig(prompt="x", adapters=(AdapterWeight("c", 1.0),)),  # joins "a" at 0.3
        GenerateConfig(prompt="x", adapters=(AdapterWeight("d", 1.0),)),
    ]  # both groups have 2 adapters
    assert group_requests(configs, max_adapters=2) == [[0, 1, 6], [2], [3, 7], [4], [5], [8]]


def test_a_bad_request_fails_alone(tiny_model, random_adapters):
    batcher = Batcher(Generator(str(tiny_model), random_adapters))
    with pytest.raises(Exception, match="no adapter named 'nope'"):
        batcher.generate(GenerateConfig(prompt="x", steps=1, adapters=(AdapterWeight("nope", 1.0),)))
    assert len(batcher.generate(GenerateConfig(prompt="x", steps=1, count=2))) == 2


def test_the_web_app_draws_concurrent_generate_requests_together(tiny_model, random_adapters, tmp_path):
    from app_server import serving
    from gradio_client import Client

    from sdlora.ui.studio import Studio

    studio = Studio(str(tiny_model), random_adapters.root, tmp_path / "concepts", work_dir=tmp_path / "work")
    with serving(studio) as server:
        generator = studio.generator()
        calls: list[int] = []
        draw = generator.generate_batch
        generator.generate_batch = lambda configs: calls.append(len(configs)) or draw(configs)
        client = Client(server.url, verbose=False)
        jobs = [
            client.submit(
                prompt="sks",
                seed=seed,
                steps=2,
                guidance=5.0,
                scheduler="Euler",
                adapter_1="a0",
                weight_1=1.0,
                api_name="/generate",
            )
            for seed in range(8)
        ]
        seeds = sorted(int(job.result()[1].split("Seed: ")[1].split(",")[0]) for job in jobs)
    assert seeds == list(range(8))
    assert (
        sum(calls) == 8 and len(calls) < 8
    )  # one at a time (the old concurrency limit of 1) would be 8 calls
