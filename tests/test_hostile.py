"""A shared server no client can break, round two (issue 24): each test is what a hostile client did."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from conftest import draw_concept
from safetensors.torch import load_file, save_file
from tiny_models import IMAGE_SIZE

from sdlora.cli import main
from sdlora.config import (
    MAX_PROMPT_CHARS,
    DataConfig,
    GenerateConfig,
    LoraSpec,
    TrainConfig,
    check_adapter_name,
)
from sdlora.errors import ConfigError, SdloraError
from sdlora.events import Started, Step, StopFlag
from sdlora.generation.batching import Batcher
from sdlora.generation.generate import Generator
from sdlora.jobs import queue as queue_module
from sdlora.jobs.queue import HISTORY_KEPT, MAX_PENDING_PER_CLIENT, JobQueue
from sdlora.library.formats import Adapter, write_adapter
from sdlora.library.store import AdapterLibrary
from sdlora.models.loading import load_pipeline
from sdlora.training.lora import add_lora, lora_state_dict
from sdlora.ui.studio import Studio

REPO = Path(__file__).resolve().parents[1]
BIDI = ["\u202e", "\u202a", "\u202b", "\u202c", "\u202d", "\u2066", "\u2067", "\u2068", "\u2069", "\u200e"]
BIDI += ["\u200f", "\u061c"]


def one_line(exc_info, *names: str) -> str:
    """The refusal is one short line that names what it refuses."""
    message = str(exc_info.value)
    assert "\n" not in message and len(message) < 500, message
    for name in names:
        assert name in message, (name, message)
    return message


def job_config(tiny_model, images, name: str, **changes) -> TrainConfig:
    data = DataConfig(images=str(images), trigger_word="sks", resolution=IMAGE_SIZE)
    settings = {
        "base_model": str(tiny_model),
        "name": name,
        "steps": 2,
        "data": data,
        "lora": LoraSpec(rank=4),
    }
    return TrainConfig(**{**settings, **changes})


@pytest.fixture(scope="module")
def adapter_tensors(tiny_model) -> dict[str, torch.Tensor]:
    """A random rank-4 LoRA of the tiny model in kohya keys."""
    unet = load_pipeline(str(tiny_model)).unet
    add_lora(unet, LoraSpec(rank=4, alpha=4))
    torch.manual_seed(0)
    state = {k: torch.randn_like(v) * 0.3 for k, v in lora_state_dict(unet).items()}
    folder = Path(os.environ.get("TMPDIR", "/tmp"))
    path = write_adapter(
        folder / f"hostile-{os.getpid()}.safetensors", Adapter.from_peft(state, 4.0), "kohya"
    )
    tensors = load_file(path)
    path.unlink()
    return tensors


def good_adapter(path: Path, tensors) -> Path:
    save_file(tensors, str(path))
    return path


def damaged_adapter(path: Path, tensors) -> Path:
    """A file whose header and sizes are sound but whose first layer does not fit the model."""
    tensors = dict(tensors)
    down = next(k for k in sorted(tensors) if k.endswith("lora_down.weight"))
    up = down.replace("lora_down", "lora_up")
    tensors[down] = torch.randn(tensors[down].shape[0], tensors[down].shape[1] + 3)
    tensors[up] = torch.randn(tensors[up].shape[0] + 3, tensors[up].shape[1])
    save_file(tensors, str(path))
    return path


# 1, 4, 5, 8. The app over HTTP: what a client may read, what it may send ---------------------------------


@pytest.fixture(scope="module")
def served(tiny_model, adapter_tensors, tmp_path_factory):
    """The app over a library holding a damaged adapter and a cancelled job (its images kept); no job runs."""
    from app_server import serving
    from gradio_client import Client

    root = tmp_path_factory.mktemp("hostile-app")
    concept = root / "concept"
    concept.mkdir()
    for i in range(2):
        draw_concept(concept / f"img{i}.png", i)
    studio = Studio(str(tiny_model), root / "adapters", root / "concepts", work_dir=root / "work")
    studio.adapters_dir.mkdir()
    damaged_adapter(studio.adapters_dir / "broken.safetensors", adapter_tensors)
    job = studio.queue.add(job_config(tiny_model, concept, "secret-job"))
    studio.queue.cancel(job.id)
    studio.worker.poll = lambda: None  # jobs queued here stay queued: the caps are what is tested
    with serving(studio) as server:
        server.client = Client(server.url, verbose=False)
        server.concept = concept
        server.job = studio.queue.job(job.id)
        yield server


def fetched(server, path: Path) -> int:
    """The HTTP status of fetching a server file by path, the way any client can try."""
    return httpx.get(f"{server.url}gradio_api/file={path}", timeout=30).status_code


def test_the_queue_file_job_images_and_other_users_images_are_not_served(served):
    client = served.client
    gallery, _, _ = client.predict(prompt="a red circle", seed=3, steps=1, api_name="/generate")
    assert Path(gallery[0]["image"]).is_file()  # what the page was meant to show reaches it
    queue_file = served.studio.queue.path
    job_image = Path(served.job.images) / "img0.png"
    generated = next((served.studio.work_dir / "images").iterdir())
    assert queue_file.is_file() and job_image.is_file() and generated.is_file()
    for path in (queue_file, job_image, generated, served.studio.adapters_dir / "broken.safetensors"):
        assert fetched(served, path) in (403, 404), path


def test_a_damaged_adapter_in_the_library_is_listed_with_a_note(served):
    table, notes = served.client.predict(api_name="/list_adapters")
    assert "broken" not in [row[0] for row in table["data"]]
    assert "broken.safetensors" in notes


def raw_call(server, api_name: str, **named) -> str:
    """Call an endpoint with JSON as a hostile client writes it (NaN included); the error message, or ''."""
    endpoint = server.client.view_api(print_info=False, return_format="dict")["named_endpoints"][
        f"/{api_name}"
    ]
    data = []
    for parameter in endpoint["parameters"]:
        name = parameter["parameter_name"]
        data.append(named.pop(name) if name in named else parameter["parameter_default"])
    assert not named, f"no parameters {sorted(named)} in /{api_name}"
    body = json.dumps({"data": data})  # json writes NaN as NaN, as a raw client may
    url = f"{server.url}gradio_api/call/{api_name}"
    event = httpx.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=30)
    event.raise_for_status()
    answer = httpx.get(f"{url}/{event.json()['event_id']}", timeout=300).text
    assert "event: error" in answer, answer
    error = json.loads(answer.split("event: error", 1)[1].split("data:", 1)[1].strip().splitlines()[0])
    return (error or {}).get("error") or ""


@pytest.mark.parametrize(
    "values, field",
    [
        ({"seed": 2**70}, "seed"),
        ({"seed": math.nan}, "seed"),
        ({"width": math.nan}, "width"),
        ({"prompt": "a" * 1_000_000}, "prompt"),
        ({"negative_prompt": "b" * (MAX_PROMPT_CHARS + 1)}, "negative_prompt"),
    ],
)
def test_generate_refuses_out_of_range_values_in_one_line_naming_the_field(served, values, field):
    message = raw_call(served, "generate", **{"prompt": "a red circle", "steps": 1, **values})
    assert message and "\n" not in message and field in message, message


@pytest.mark.parametrize(
    "config, field",
    [
        ({"lora": {"alpha": math.nan}}, "alpha"),
        ({"prior_loss_weight": math.nan}, "prior_loss_weight"),
        ({"steps": 10**9}, "steps"),
        ({"learning_rate": 1e308}, "learning_rate"),
        ({"lora": {"target_modules": ["*"]}}, "target module"),
        ({"preview_prompts": ["p" * 1_000_000]}, "preview_prompts"),
    ],
)
def test_a_settings_object_over_http_is_refused_in_one_line_naming_the_field(served, config, field):
    uploads = [("files", (p.name, p.read_bytes())) for p in sorted(served.concept.iterdir())]
    paths = httpx.post(f"{served.url}gradio_api/upload", files=uploads, timeout=30).json()
    files = [{"path": path, "meta": {"_type": "gradio.FileData"}} for path in paths]
    message = raw_call(served, "train", files=files, config={"name": "nan-job", **config})
    assert message and "\n" not in message and field in message, message


@pytest.mark.parametrize(
    "values, field",
    [
        ({"rank": math.nan}, "rank"),
        ({"steps": math.nan}, "steps"),
        ({"learning_rate": math.inf}, "learning_rate"),
    ],
)
def test_the_train_fields_over_http_are_refused_in_one_line_naming_the_field(served, values, field):
    uploads = [("files", (p.name, p.read_bytes())) for p in sorted(served.concept.iterdir())]
    paths = httpx.post(f"{served.url}gradio_api/upload", files=uploads, timeout=30).json()
    files = [{"path": path, "meta": {"_type": "gradio.FileData"}} for path in paths]
    message = raw_call(served, "train", files=files, **values)
    assert message and "\n" not in message and field in message, message


def test_one_client_cannot_fill_the_queue(served):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    files = [handle_file(str(p)) for p in sorted(served.concept.iterdir())]
    settings = {"files": files, "steps": 2, "resolution": IMAGE_SIZE, "preview_every": 0}
    for i in range(MAX_PENDING_PER_CLIENT):
        served.client.predict(**settings, name=f"mine-{i}", api_name="/queue_add")
    with pytest.raises(AppError) as refused:
        served.client.predict(**settings, name="one-too-many", api_name="/queue_add")
    one_line(refused, f"you already have {MAX_PENDING_PER_CLIENT} jobs")
    names = [job.name for job in served.studio.queue.jobs()]
    assert (
        "one-too-many" not in names
        and len(list(served.studio.queue.folder.glob("*/images"))) == MAX_PENDING_PER_CLIENT + 1
    )


# 2, 3. Generation goes on for everyone ---------------------------------------------------------------------


def test_a_batch_with_one_broken_request_serves_the_others(tiny_model, adapter_tensors, tmp_path):
    library = AdapterLibrary(tmp_path / "lib")
    library.root.mkdir()
    damaged_adapter(library.root / "broken.safetensors", adapter_tensors)
    batcher = Batcher(Generator(str(tiny_model), library), window=0.5, max_wait=3)
    from sdlora.config import AdapterWeight

    configs = [
        GenerateConfig(prompt="a red circle", steps=1, seed=1),
        GenerateConfig(prompt="x", steps=1, seed=2, adapters=(AdapterWeight("broken", 1.0),)),
        GenerateConfig(prompt="a blue circle", steps=1, seed=3),
    ]
    results: list = [None] * 3
    start = threading.Barrier(3)

    def send(i: int) -> None:
        start.wait()
        try:
            results[i] = batcher.generate(configs[i])
        except SdloraError as exc:
            results[i] = exc

    threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert isinstance(results[1], SdloraError) and "broken.safetensors" in str(results[1])
    assert len(results[0]) == 1 and len(results[2]) == 1, results


def test_a_failed_base_switch_keeps_generating_with_the_old_model(tiny_model, tmp_path):
    studio = Studio(str(tiny_model), tmp_path / "adapters", tmp_path / "concepts", work_dir=tmp_path / "work")
    studio.generator()
    not_a_model = studio.work_dir / "not-a-model"
    not_a_model.mkdir()
    for source in (str(not_a_model), "nobody/not-in-the-cache"):
        with pytest.raises(SdloraError) as refused:
            studio.set_base_model(source)
        one_line(refused, f"still uses {tiny_model}")
        assert studio.base_model == str(tiny_model)
        assert studio.model_status()["state"] == "loaded"
        assert len(studio.generate(GenerateConfig(prompt="a red circle", steps=1, seed=1))) == 1


# 4, 5. Settings: bounds from the one home, in one line naming the field -------------------------------------


@pytest.mark.parametrize(
    "values, field",
    [
        ({"steps": 10**7}, "steps"),
        ({"batch_size": 10**6}, "batch_size"),
        ({"lora": {"rank": 10**6}}, "rank"),
        ({"gradient_accumulation_steps": 10**6}, "gradient_accumulation_steps"),
        ({"warmup_steps": 10**9}, "warmup_steps"),
        ({"cpu_threads": 10**6}, "cpu_threads"),
        ({"preview_inference_steps": 10**6}, "preview_inference_steps"),
        ({"preview_prompts": ["x"] * 1000}, "preview_prompts"),
        ({"preview_seeds": [2**70]}, "preview_seeds"),
        ({"learning_rate": 1e308}, "learning_rate"),
        ({"learning_rate": math.inf}, "learning_rate"),
        ({"learning_rate": 10**400}, "learning_rate"),  # beyond a float: refused, not an OverflowError
        ({"steps": "9" * 100_000}, "steps"),
        ({"max_grad_norm": -1.0}, "max_grad_norm"),
        ({"lora": {"alpha": math.nan}}, "alpha"),
        ({"prior_loss_weight": math.nan}, "prior_loss_weight"),
        ({"lora": {"target_modules": ["*"]}}, "'*'"),
        ({"lora": {"extra_target_modules": [".*"]}}, "'.*'"),
        ({"seed": 2**70}, "seed"),
        ({"data": {"images": "d", "caption_template": "c" * 10**6}}, "caption_template"),
    ],
)
def test_absurd_and_non_finite_settings_are_refused_in_one_line_naming_the_field(values, field):
    values = {"base_model": "m", **values}
    values.setdefault("data", {}).setdefault("images", "d")
    with pytest.raises(ConfigError) as refused:
        TrainConfig.from_dict(values).validate()
    one_line(refused, field)


def test_every_numeric_setting_has_its_bounds_beside_its_default():
    import dataclasses

    for cls in (TrainConfig, DataConfig, LoraSpec, GenerateConfig):
        for f in dataclasses.fields(cls):
            if f.name in ("resolution", "data", "lora"):  # resolution: check_image_size, by the model's size
                continue
            if str(f.type) in ("int", "float", "tuple[int, ...]"):
                low, high = f.metadata["bounds"]
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                assert all(low <= d <= high for d in (default if isinstance(default, tuple) else (default,)))


def test_the_cli_refuses_a_seed_out_of_range_in_one_line(tiny_model, concept_dir, tmp_path, capsys):
    argv = ["train", "--base-model", str(tiny_model), "--images", str(concept_dir)]
    argv += ["--output", str(tmp_path / "out"), "--steps", "1", "--seed", str(2**70)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: seed must be") and "\n" not in err, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.safetensors"))


def test_the_resume_refusal_is_printed_once(tiny_model, concept_dir, tmp_path, capsys):
    argv = ["train", "--base-model", str(tiny_model), "--images", str(concept_dir), "--steps", "2"]
    argv += ["--output", str(tmp_path / "out"), "--rank", "4", "--resolution", str(IMAGE_SIZE)]
    assert main([*argv, "--quiet"]) == 0
    capsys.readouterr()
    assert main([*argv, "--lr", "5e-3", "--resume", "latest"]) == 2
    captured = capsys.readouterr()
    printed = captured.out + captured.err
    assert printed.count("learning_rate") == 1, printed


# 4. The queue: caps, a small file, writes only on change ----------------------------------------------------


def test_queue_caps_per_client_and_in_all(tiny_model, concept_dir, tmp_path, monkeypatch):
    queue = JobQueue(tmp_path / "lib")
    for i in range(MAX_PENDING_PER_CLIENT):
        queue.add(job_config(tiny_model, concept_dir, f"a{i}"), client="address 10.0.0.1")
    with pytest.raises(ConfigError) as refused:
        queue.add(job_config(tiny_model, concept_dir, "a9"), client="address 10.0.0.1")
    one_line(refused, "you already have")
    queue.add(job_config(tiny_model, concept_dir, "b0"), client="address 10.0.0.2")
    monkeypatch.setattr(queue_module, "MAX_PENDING_JOBS", MAX_PENDING_PER_CLIENT + 1)
    with pytest.raises(ConfigError) as refused:
        queue.add(job_config(tiny_model, concept_dir, "c0"), client="address 10.0.0.3")
    one_line(refused, "the queue already holds")
    assert (
        len(list(queue.folder.glob("*/images"))) == MAX_PENDING_PER_CLIENT + 1
    )  # nothing copied for refusals


def test_ended_jobs_beyond_the_history_go_with_their_images(tiny_model, concept_dir, tmp_path):
    queue = JobQueue(tmp_path / "lib")
    ids = []
    for i in range(HISTORY_KEPT + 5):
        job = queue.add(job_config(tiny_model, concept_dir, f"j{i}"))
        queue.claim_next()
        queue.end(job.id, "failed", "it failed")
        ids.append(job.id)
    kept = [job.id for job in queue.jobs()]
    assert kept == ids[-HISTORY_KEPT:]
    assert sorted(p.name for p in queue.folder.iterdir() if p.is_dir()) == sorted(kept)


def test_the_queue_file_is_written_only_on_change(tiny_model, concept_dir, tmp_path, monkeypatch):
    queue = JobQueue(tmp_path / "lib")
    job = queue.add(job_config(tiny_model, concept_dir, "run"))

    def identity():
        stat = queue.path.stat()
        return stat.st_ino, stat.st_mtime_ns

    before = identity()
    queue.move(job.id, 1)  # a move that moves nothing
    queue.clear_leftovers()
    assert identity() == before
    running = queue.claim_next()
    monkeypatch.setattr(queue_module, "STOP_CHECK_SECONDS", 0.0)
    stop = StopFlag()
    progress = queue_module._ProgressWriter(queue, running, stop)
    progress(Started(9, 0, 4, 10, 100, (), "cpu", "no"))
    written = identity()
    for step in range(1, 6):  # a running job reads the file each time, but writes its step only now and then
        progress(Step(step, 9, 1.0, 1e-4, 0.1, 1.0))
    assert identity() == written and not stop.requested
    queue.cancel(running.id)  # from another process: a stop request is still read at once
    progress(Step(6, 9, 1.0, 1e-4, 0.1, 1.0))
    assert stop.requested


# 6. Names: one rule for every verb; a queued job's name is taken ------------------------------------------


@pytest.fixture()
def library(tmp_path, adapter_tensors) -> AdapterLibrary:
    lib = AdapterLibrary(tmp_path / "lib")
    lib.root.mkdir()
    good_adapter(lib.root / "good.safetensors", adapter_tensors)
    return lib


def test_a_queued_jobs_name_is_taken_by_no_other_verb(library, tiny_model, concept_dir, tmp_path):
    JobQueue(library.root).add(job_config(tiny_model, concept_dir, "mine"))
    source = library.get("good").path
    with pytest.raises(SdloraError) as refused:
        library.import_file(source, name="mine")
    one_line(refused, "'mine'", "queued")
    with pytest.raises(SdloraError) as refused:
        library.rename("good", "mine")
    one_line(refused, "'mine'", "queued")
    assert library.import_file(source).name == "good-2"  # a name derived from the file steps aside
    assert sorted(a.name for a in library.list().adapters) == ["good", "good-2"]


def test_dot_dot_names_are_refused_not_mapped(library, tmp_path):
    source = library.get("good").path
    before = sorted(p.name for p in library.root.iterdir())
    for verb in (
        lambda: library.import_file(source, name="../x"),
        lambda: library.rename("../../good", "renamed"),
        lambda: library.rename("good", "../renamed"),
        lambda: library.delete("../lib/good"),
    ):
        with pytest.raises(SdloraError) as refused:
            verb()
        one_line(refused, "plain file name")
    assert sorted(p.name for p in library.root.iterdir()) == before


@pytest.mark.parametrize("control", BIDI)
def test_bidirectional_controls_are_refused_in_adapter_and_job_names(control, library):
    name = f"{control}gnp.exe"
    with pytest.raises(ConfigError) as refused:
        check_adapter_name(name)
    one_line(refused, "text-direction")
    with pytest.raises(ConfigError):
        TrainConfig(base_model="m", name=name, data=DataConfig(images="d")).validate()
    with pytest.raises(SdloraError):
        library.import_file(library.get("good").path, name=name)
    with pytest.raises(SdloraError):
        library.rename("good", name)


# 7. The training size follows the base model's native size ---------------------------------------------------


def test_the_training_size_cap_follows_the_native_size_when_queued(tiny_model, concept_dir, tmp_path):
    studio = Studio(str(tiny_model), tmp_path / "adapters", tmp_path / "concepts", work_dir=tmp_path / "work")
    studio.worker.poll = lambda: None
    files = [str(p) for p in sorted(concept_dir.iterdir())]
    config = job_config(
        tiny_model, "(uploaded)", "big", data=DataConfig(images="-", resolution=4 * IMAGE_SIZE)
    )
    with pytest.raises(ConfigError) as refused:
        studio.queue_training(config, files, {})
    one_line(refused, "training resolution", f"native {IMAGE_SIZE} px")
    assert studio.queue.jobs() == []


# 8. The app's work folder goes on SIGTERM ---------------------------------------------------------------------


def test_the_work_folder_goes_when_the_server_gets_sigterm(tiny_model, tmp_path):
    temp = tmp_path / "tmp"
    temp.mkdir()
    from app_server import free_port

    env = {**os.environ, "TMPDIR": str(temp), "PYTHONPATH": str(REPO)}
    command = [
        sys.executable,
        str(REPO / "app.py"),
        "--base-model",
        str(tiny_model),
        "--port",
        str(free_port()),
    ]
    command += ["--adapters-dir", str(tmp_path / "adapters")]
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in server.stdout:
            if "sdlora is running" in line:
                break
        assert len(list(temp.glob("sdlora-app-*"))) == 1
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
    assert list(temp.glob("sdlora-app-*")) == []


# 9. The config the app saves beside an adapter retrains to the same tensors through the CLI --------------


def test_a_config_saved_by_the_app_retrains_to_identical_tensors_through_the_cli(
    tiny_model, concept_dir, tmp_path, capsys
):
    studio = Studio(str(tiny_model), tmp_path / "adapters", tmp_path / "concepts", work_dir=tmp_path / "work")
    busy = threading.Event()

    def another_user() -> None:  # a server's other threads draw from torch's shared generator meanwhile
        while not busy.is_set():
            torch.rand(1)

    config = job_config(tiny_model, "(uploaded)", "same", learning_rate=1e-3, steps=4, seed=11)
    config = config.replace(preview_every=0, final_preview=False)
    neighbour = threading.Thread(target=another_user, daemon=True)
    neighbour.start()
    try:
        files = [str(p) for p in concept_dir.iterdir()]
        job = studio.queue_training(config, files, {"img0.png": "a red circle"})
        deadline = time.monotonic() + 240
        while studio.queue.job(job.id).state in ("queued", "running") and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        busy.set()
    assert studio.queue.job(job.id).state == "done", studio.queue.job(job.id).message
    saved = studio.adapters_dir / "same.config.json"
    argv = ["train", "--config", str(saved), "--images", str(concept_dir), "--output", str(tmp_path / "cli")]
    assert main([*argv, "--quiet"]) == 0, capsys.readouterr().err
    app_made = load_file(studio.adapters_dir / "same.safetensors")
    cli_made = load_file(tmp_path / "cli" / "same.safetensors")
    assert app_made.keys() == cli_made.keys()
    for key in app_made:
        assert torch.equal(app_made[key], cli_made[key]), key
