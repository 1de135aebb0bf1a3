"""Validation loss: held-out images scored at fixed noise and timesteps, without touching training."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import draw_concept
from safetensors.torch import load_file

from sdlora.config import TrainConfig, ValidationConfig
from sdlora.errors import ConceptImagesError, ConfigError
from sdlora.events import Saved, Started, Validated
from sdlora.training.checkpoint_adapters import VALIDATION_KEY, list_checkpoint_adapters
from sdlora.training.data import load_concept_images
from sdlora.training.loop import train
from sdlora.training.metrics import metrics_path, read_metrics
from sdlora.training.validation import hold_out


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, Path]:
    """Four concept images and two validation images of another colour, each with a caption."""
    root = tmp_path_factory.mktemp("validation-images")
    concept, held = root / "concept", root / "held"
    concept.mkdir()
    held.mkdir()
    for i in range(4):
        draw_concept(concept / f"img{i}.png", i)
    for i in range(2):
        draw_concept(held / f"val{i}.png", 2 * i, colour=(30, 160, 40))
        (held / f"val{i}.txt").write_text("a green circle")
    return concept, held


@pytest.fixture(scope="module")
def base(tiny_model, images, tmp_path_factory) -> TrainConfig:
    from sdlora.config import DataConfig, LoraSpec

    return TrainConfig(
        base_model=str(tiny_model),
        output_dir=str(tmp_path_factory.mktemp("validation-out")),
        name="plain",
        steps=4,
        learning_rate=1e-3,
        seed=7,
        cpu_threads=1,
        final_preview=False,
        data=DataConfig(images=str(images[0]), trigger_word="sks", resolution=32),
        lora=LoraSpec(rank=4, alpha=16.0),
    )


def validated(config: TrainConfig, **options) -> TrainConfig:
    return replace(config, validation=replace(config.validation, **options))


def run(config: TrainConfig, **kwargs) -> tuple[list, Path]:
    events: list = []
    result = train(config, on_event=events.append, **kwargs)
    return events, result.adapter_path


@pytest.fixture(scope="module")
def plain_run(base):
    return run(base)


@pytest.fixture(scope="module")
def folder_run(base, images):
    """Validation on a folder every 2 steps, logged to TensorBoard when it is installed."""
    tensorboard = _has("tensorboard")
    config = validated(
        replace(base, name="with-folder"),
        validation_folder=str(images[1]),
        validation_every=2,
        log_with="tensorboard" if tensorboard else "",
    )
    return config, *run(config)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_a_validation_folder_leaves_the_trained_adapter_bit_for_bit_the_same(plain_run, folder_run):
    _, plain = plain_run
    _, events, with_folder = folder_run
    assert [e.step for e in events if isinstance(e, Validated)] == [2, 4]
    a, b = load_file(str(plain)), load_file(str(with_folder))
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_metrics_file_has_a_row_per_step_and_the_validation_cell_only_when_evaluated(folder_run):
    config, events, _ = folder_run
    rows = read_metrics(metrics_path(config))
    assert [r.step for r in rows] == [1, 2, 3, 4]
    assert [r.validation_loss is not None for r in rows] == [False, True, False, True]
    shown = {e.step: e.validation_loss for e in events if isinstance(e, Validated)}
    assert {r.step: r.validation_loss for r in rows if r.validation_loss is not None} == shown
    assert metrics_path(config).read_text().splitlines()[0] == "step,loss,validation_loss,learning_rate"


def test_the_curve_is_the_same_in_a_second_run_stopped_and_resumed(base, images, folder_run):
    config, _, _ = folder_run
    second = validated(
        replace(base, name="resumed", steps=2), validation_folder=str(images[1]), validation_every=2
    )
    run(second)
    run(replace(second, steps=4), resume="latest")
    first_rows = metrics_path(config).read_text()
    assert metrics_path(second).read_text() == first_rows  # no duplicate rows, the same figures


def test_checkpoint_adapters_carry_their_validation_loss(folder_run):
    config, events, _ = folder_run
    saved = list_checkpoint_adapters(config.output_dir, config.name)
    assert [c.step for c in saved] == [2, 4]
    losses = {e.step: e.validation_loss for e in events if isinstance(e, Validated)}
    assert {c.step: c.validation_loss for c in saved} == losses
    assert [e.path for e in events if isinstance(e, Saved) and e.kind == "checkpoint adapter"] == [
        str(c.path) for c in saved
    ]
    assert all(load_file(str(c.path)) for c in saved)  # real adapter files


def test_tensorboard_event_file_holds_the_scalars(folder_run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config, _, _ = folder_run
    files = list((Path(config.output_dir) / ".runs" / config.name / "logs").rglob("events.out.tfevents*"))
    assert files
    tags = set()
    for file in files:
        accumulator = EventAccumulator(str(file))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
        if "validation_loss" in accumulator.Tags()["scalars"]:
            assert [s.step for s in accumulator.Scalars("validation_loss")] == [2, 4]
    assert {"loss", "validation_loss", "learning_rate"} <= tags


def test_held_out_images_are_a_seeded_choice_and_leave_one_to_train_on(base, images):
    concepts = load_concept_images(base.data, bucket_step=8)
    kept, held = hold_out(concepts, 2, seed=7)
    again_kept, again_held = hold_out(concepts, 2, seed=7)
    assert [c.path for c in held] == [c.path for c in again_held]
    assert len(kept.images) == 2 and not {c.path for c in held} & {c.path for c in kept.images}
    with pytest.raises(ConceptImagesError, match="at least one must remain"):
        hold_out(concepts, 4, seed=7)


def test_a_held_out_run_trains_on_the_rest(base):
    config = validated(replace(base, name="held", steps=2), validation_images=1)
    events, _ = run(config)
    started = next(e for e in events if isinstance(e, Started))
    assert started.image_count == 3
    assert [e.step for e in events if isinstance(e, Validated)] == [1, 2]  # ten a run, at least every step


def test_adapters_saved_every_n_epochs_land_where_an_epoch_ends(base):
    config = replace(base, name="by-epochs", steps=5, batch_size=2)
    run(replace(config, validation=replace(config.validation, adapter_every_epochs=1)))
    # four images, two a step: an epoch ends every second step, and the last step is always kept
    assert [c.step for c in list_checkpoint_adapters(config.output_dir, config.name)] == [2, 4, 5]


def test_validation_settings_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="not both"):
        ValidationConfig(validation_images=1, validation_folder="x").validate()
    with pytest.raises(ConfigError, match="needs validation images"):
        ValidationConfig(stop_when_validation_rises=2).validate()
    with pytest.raises(ConfigError, match="by steps or by epochs, not both"):
        ValidationConfig(adapter_every=2, adapter_every_epochs=1).validate()


def test_rising_validation_stops_the_run_and_keeps_the_best_checkpoint(base, images, monkeypatch):
    scripted = iter([1.0, 0.5, 0.7, 0.8, 0.9, 1.0])
    monkeypatch.setattr("sdlora.training.loop.validation_loss", lambda *args: next(scripted))
    config = validated(
        replace(base, name="rises", steps=6),
        validation_folder=str(images[1]),
        validation_every=1,
        stop_when_validation_rises=2,
    )
    events, adapter = run(config)
    assert [e.step for e in events if isinstance(e, Validated)] == [1, 2, 3, 4]
    best = {c.step: c for c in list_checkpoint_adapters(config.output_dir, config.name)}[2]
    assert adapter.read_bytes() == best.path.read_bytes()
    assert load_file(str(adapter))  # a real adapter
    from sdlora.library.formats.files import read_metadata

    assert read_metadata(adapter)[VALIDATION_KEY] == "0.5"
    assert "kept step 2 as the adapter" in events[-1].message


# The CLI verbs over the folder run's checkpoint adapters (steps 2 and 4); last in the file, as `keep`
# replaces that run's adapter.
def test_adapters_compare_draws_checkpoints_by_weights_and_seeds_with_their_losses(
    folder_run, tmp_path, capsys
):
    from conftest import cli
    from PIL import Image

    from sdlora.generation.checkpoint_grid import FOOTER, column_label
    from sdlora.training.checkpoint_adapters import best_checkpoint

    config, _, _ = folder_run
    out = tmp_path / "grid.png"
    args = ["adapters", "compare", config.name, "--adapters-dir", config.output_dir]
    args += ["--base-model", config.base_model, "--weights", "0.5,1", "--seeds", "1", "2"]
    code, printed, _ = cli(capsys, *args, "--inference-steps", "2", "--out", str(out))
    assert code == 0 and printed.strip() == str(out)
    grid = Image.open(out)
    cell = 128  # the tiny model's 32-px images, scaled up to at least 128
    assert grid.height == 24 + 4 * cell + FOOTER  # 2 weights x 1 prompt x 2 seeds
    assert (grid.width - 2 * cell) >= 80  # the row labels, then one column per checkpoint
    saved = list_checkpoint_adapters(config.output_dir, config.name)
    best = best_checkpoint(saved)
    assert best.validation_loss == min(c.validation_loss for c in saved)
    assert column_label(best, best).endswith("best")
    assert not any(column_label(c, best).endswith("best") for c in saved if c.step != best.step)


def test_adapters_keep_makes_a_checkpoint_the_adapter(folder_run, capsys):
    from conftest import cli

    config, _, adapter = folder_run
    code, _, err = cli(
        capsys, "adapters", "keep", config.name, "--step", "3", "--adapters-dir", config.output_dir
    )
    assert code == 2 and "no checkpoint adapter at step 3; its steps: 2, 4" in err
    code, printed, _ = cli(
        capsys, "adapters", "keep", config.name, "--step", "2", "--adapters-dir", config.output_dir
    )
    assert code == 0 and "step 2" in printed
    step2 = list_checkpoint_adapters(config.output_dir, config.name)[0]
    assert adapter.read_bytes() == step2.path.read_bytes()
    assert len(list_checkpoint_adapters(config.output_dir, config.name)) == 2  # the others stay


@pytest.mark.parametrize("family_name", ["sd1", "sd3"])
def test_validation_noise_sits_at_fixed_points_spread_over_the_schedule(family_name):
    """Each family's own objective: the same noise and points give the same batch, later points more noise."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    from sdlora.models.families import family_named
    from sdlora.training.validation import ValidationSet

    family = family_named(family_name)
    scheduler = DDPMScheduler() if family_name == "sd1" else FlowMatchEulerDiscreteScheduler(shift=3.0)
    objective = family.objective(scheduler.config, family.prediction_type or "epsilon")
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0)).repeat(4, 1, 1, 1)
    noise = torch.randn(4, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    fractions = ValidationSet.__dataclass_fields__["points"].default  # the points a run scores at
    fractions = (torch.arange(fractions, dtype=torch.float64) + 0.5) / fractions
    first = objective.noised_at(latents, noise, fractions)
    again = objective.noised_at(latents, noise, fractions)
    assert torch.equal(first.noisy, again.noisy) and torch.equal(first.target, again.target)
    assert first.timesteps.tolist() == sorted(first.timesteps.tolist())
    span = scheduler.config.num_train_timesteps
    assert first.timesteps[0] < 0.5 * span < first.timesteps[-1]
    # later points are nearer the noise
    near = [
        torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
        for a, b in zip(first.noisy, noise, strict=True)
    ]
    assert near == sorted(near)


def test_the_run_view_plots_smoothed_training_validation_points_and_the_lowest_step():
    from sdlora.events import Step
    from sdlora.ui.run_view import LOWEST, TRAINING, VALIDATION, view_run

    steps = [Step(n, 6, loss, 1e-3, 0.1, 0.0) for n, loss in enumerate([1.0, 0.0, 1.0, 0.0, 1.0, 0.0], 1)]
    events = [*steps[:2], Validated(2, 0.4, 2, 0.4, 0), *steps[2:4], Validated(4, 0.5, 2, 0.4, 1), *steps[4:]]
    view = view_run(events, "mine", running=True, stop_requested=False)
    chart = view.chart()
    training = [loss for _, loss, series in chart if series == TRAINING]
    assert len(training) == 6 and training[0] == 1.0
    assert max(training[1:]) < 1.0 and min(training[1:]) > 0.0  # smoothed: never the raw 0 or 1
    assert [(s, v) for s, v, series in chart if series == VALIDATION] == [(2, 0.4), (4, 0.5)]
    assert {s for s, _, series in chart if series == LOWEST} == {2}
    assert "validation 0.5000 (lowest 0.4000 at step 2)" in view.summary()
    assert "may be overfitting" in view.summary()


def test_keep_this_one_in_the_app_replaces_the_adapter(folder_run):
    from types import SimpleNamespace

    from sdlora.ui.checkpoints_view import CheckpointHandlers

    config, _, adapter = folder_run
    forgotten = []
    studio = SimpleNamespace(
        adapters_dir=config.output_dir,
        run_name=config.name,
        base_model=config.base_model,
        forget_adapter=forgotten.append,
    )
    handlers = CheckpointHandlers(studio)
    dropdown, name = handlers.choices("")
    saved = list_checkpoint_adapters(config.output_dir, config.name)
    best = min(saved, key=lambda c: c.validation_loss)
    assert name == config.name and dropdown.value == str(best.step)
    assert [value for _, value in dropdown.choices] == ["2", "4"]
    assert "adapter of step 4" in handlers.keep("", "4")
    assert adapter.read_bytes() == saved[1].path.read_bytes() and forgotten == [config.name]


def test_a_tracker_that_is_not_installed_is_refused_before_loading(base):
    if _has("wandb"):
        pytest.skip("wandb is installed here")
    with pytest.raises(ConfigError, match="wandb package is not installed"):
        train(validated(replace(base, name="wandb"), log_with="wandb"))
