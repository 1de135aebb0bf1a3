"""The web app driven the way a script drives it: gradio_client against the launched server."""

from __future__ import annotations

import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from app_server import CONCEPTS, REPO, serving
from conftest import draw_concept
from tiny_models import IMAGE_SIZE

pytest.importorskip("sdlora.training.presets", reason="the app needs sdlora.training.presets")
pytest.importorskip("sdlora.generation.generate", reason="the app needs sdlora.generation.generate")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from safetensors import safe_open  # noqa: E402

sys.path.insert(0, str(REPO))
import app  # noqa: E402
from sdlora.events import Step  # noqa: E402
from sdlora.ui.studio import Studio  # noqa: E402


@pytest.fixture(scope="module")
def served(tiny_app):
    """The app on the tiny model (conftest's shared server), with assets/concepts as its example folders."""
    return tiny_app


@pytest.fixture()
def client(served):
    return Client(served.url, verbose=False)


@pytest.fixture()
def images(tmp_path) -> list[str]:
    folder = tmp_path / "uploads"
    folder.mkdir()
    paths = [draw_concept(folder / f"img{i}.png", i, colour=(30, 30, 220)) for i in range(3)]
    (folder / "img0.txt").write_text("a blue circle")
    return [str(p) for p in paths] + [str(folder / "img0.txt")]


def train_args(files, table, name, steps=6, preview_every=3, rank=4, **more):
    """Named inputs of /train: files, captions, then the settings by their TrainConfig names."""
    return dict(
        files=[handle_file(f) for f in files],
        captions=table,
        name=name,
        trigger_word="sks",
        caption_template="{trigger}, a circle",
        rank=rank,
        alpha=rank,
        steps=steps,
        learning_rate=1e-3,
        resolution=IMAGE_SIZE,
        preview_every=preview_every,
        seed=7,
        **more,
    )


def train_and_watch(client, files, name, **settings) -> list[tuple]:
    _, table = client.predict([handle_file(f) for f in files], api_name="/upload_images")
    client.predict(**train_args(files, table, name, **settings), api_name="/train")
    job = client.submit(api_name="/progress")
    return [tuple(out) for out in job]


STABLE_API = {
    "/upload_images",
    "/use_example",
    "/apply_preset",
    "/estimate",
    "/train",
    "/progress",
    "/stop",
    "/generate",
    "/list_adapters",
    "/adapter_details",
    "/import_adapter",
    "/export_adapter",
    "/rename_adapter",
    "/delete_adapter",
    "/load_base_model",
    "/settings",
}


def test_scripts_find_the_documented_endpoints(client):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert STABLE_API <= set(endpoints), STABLE_API - set(endpoints)


def test_upload_lists_thumbnails_and_captions_from_files_and_zip(client, images, tmp_path):
    archive = tmp_path / "more.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(images[1], "nested/folder/zipped.png")
        zf.writestr("nested/folder/zipped.txt", "a zipped circle")
        zf.writestr("notes.md", "ignored")
    gallery, table = client.predict(
        [handle_file(p) for p in [*images, str(archive)]],
        0,
        api_name="/upload_images",  # 0: native size
    )
    assert len(gallery) == 4
    captions = {row[0]: row[1] for row in table["data"]}
    assert captions == {
        "img0.png": "a blue circle",
        "img1.png": "",
        "img2.png": "",
        "zipped.png": "a zipped circle",
    }
    assert {row[2] for row in table["data"]} == {
        "32x32"
    }  # the bucket each trains in (48x40 images: square here)


def test_unusable_uploads_are_no_thumbnails_and_the_table_says_why(client, images, tmp_path):
    empty, truncated = tmp_path / "empty.png", tmp_path / "cut.png"
    empty.write_bytes(b"")
    truncated.write_bytes(Path(images[0]).read_bytes()[:60])
    gallery, table = client.predict(
        [handle_file(p) for p in [images[0], str(empty), str(truncated)]], 0, api_name="/upload_images"
    )
    assert len(gallery) == 1  # only the readable image is shown as a thumbnail
    buckets = {row[0]: row[2] for row in table["data"]}
    assert buckets["img0.png"] == "32x32"
    assert buckets["empty.png"].startswith("skipped: ") and buckets["cut.png"].startswith("skipped: ")


def test_zip_that_escapes_its_folder_is_refused_with_a_message(client, tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../../outside.png", b"x")
    with pytest.raises(AppError, match="unsafe path"):
        client.predict([handle_file(str(archive))], api_name="/upload_images")


def test_example_concept_loads_in_one_click(client):
    star = CONCEPTS / "star"
    images = sorted(star.glob("*.png"))
    files, gallery, table, name = client.predict("star", api_name="/use_example")
    assert len(gallery) == len(images) and len(files) == len(images) + len(list(star.glob("*.txt")))
    captions = {row[0]: row[1] for row in table["data"]}
    assert captions[images[1].name] == images[1].with_suffix(".txt").read_text().strip()
    assert name == "star"  # the trigger word stays the page's: one convention for every concept
    with pytest.raises(AppError, match="not in the list of choices|no example concept"):
        client.predict("../../etc", api_name="/use_example")


def test_preset_fills_settings_and_estimate_is_shown(client):
    from sdlora.config import preview_interval
    from sdlora.training.presets import NOTES, PRESETS
    from sdlora.ui.train_handlers import preset_fields

    *values, preview_every, note = client.predict("Character", api_name="/apply_preset")
    filled = dict(zip(preset_fields(), values, strict=True))
    preset = PRESETS["Character"]
    assert (filled["rank"], filled["steps"], filled["resolution"]) == (
        preset["lora.rank"],
        preset["steps"],
        preset["data.resolution"],
    )
    assert filled["learning_rate"] == pytest.approx(preset["learning_rate"]) and NOTES["Character"] in note
    assert filled["regularization_images"] == "" and filled["extra_target_modules"] == []
    assert preview_every == preview_interval(preset["steps"]) < preset["steps"]
    text = client.predict(rank=4, alpha=4, steps=100, resolution=0, api_name="/estimate")
    assert text.startswith("Estimate: about") and "100 steps on cpu" in text and "captioning" not in text
    table = {"headers": ["image", "caption", "bucket"], "data": [["a.png", "", ""], ["b.png", "typed", ""]]}
    text = client.predict(captions=table, rank=4, alpha=4, steps=100, resolution=0, api_name="/estimate")
    # Offline, with no captioner's weights here, "Caption images" cannot fill the empty row: not counted.
    assert "captioning" not in text


def test_upload_train_generate_with_two_adapters_and_download_both_formats(client, served, images, tmp_path):
    for name in ("blue-circles", "blue-circles-b"):
        outputs = train_and_watch(client, images, name)
        summaries = [summary for summary, _, _ in outputs]
        assert any("step 6/6" in s for s in summaries), summaries
        final_summary, curve, previews = outputs[-1]
        assert "finished" in final_summary
        assert [row[0] for row in curve["data"]] == list(range(1, 7))
        assert len(previews) == 2  # two fixed seeds, refreshed at steps 3 and 6

    table, _ = client.predict(api_name="/list_adapters")
    rows = {row[0]: row for row in table["data"]}
    assert {"blue-circles", "blue-circles-b"} <= set(rows)
    assert rows["blue-circles"][2:5] == [4, 6, "sks"]
    preview, _ = client.predict("blue-circles", api_name="/adapter_details")
    assert preview and Path(preview).is_file()

    slots = dict(adapter_1="blue-circles", weight_1=0.5, adapter_2="blue-circles-b", weight_2=1.0)
    gallery, parameters, grid = client.predict(
        prompt="sks, a circle",
        seed=5,
        steps=2,
        guidance=5.0,
        scheduler="Euler",
        count=2,
        **slots,
        comparison_grid=True,
        api_name="/generate",
    )
    assert len(gallery) == 2 and Path(grid).is_file()  # two seeds, and the base beside each adapter
    assert "<lora:blue-circles:0.5>" in parameters and "<lora:blue-circles-b:1>" in parameters
    assert "Seed: 5" in gallery[0]["caption"]

    for fmt, prefix, file_name in (
        ("diffusers", "unet.", "blue-circles.diffusers.safetensors"),
        ("kohya", "lora_unet_", "blue-circles.safetensors"),
    ):
        path = client.predict("blue-circles", fmt, api_name="/export_adapter")
        assert Path(path).name == file_name
        with safe_open(path, framework="pt") as handle:
            assert all(key.startswith(prefix) for key in handle.keys())


def test_one_training_job_at_a_time_and_stop_saves(client, served, images):
    _, table = client.predict([handle_file(f) for f in images], api_name="/upload_images")
    client.predict(**train_args(images, table, "long-run", steps=100_000, preview_every=0), api_name="/train")
    client.predict(**train_args(images, table, "second"), api_name="/train")  # waits in the queue
    second = served.studio.queue.jobs()[-1]
    assert (second.name, second.state) == ("second", "queued") and served.studio.run_name == "long-run"
    client.predict(job_id=second.id, api_name="/queue_cancel")

    reloaded = Client(served.url, verbose=False)  # a new page re-attaches to the run on the server
    stream = reloaded.submit(api_name="/progress")
    assert served.studio.run.running
    while not any(
        isinstance(e, Step) for e in served.studio.run.snapshot()
    ):  # a stop before step 1 saves nothing
        time.sleep(0.05)
    summary, _, _ = client.predict(api_name="/stop")
    final = [tuple(out) for out in stream][-1][0]
    assert "stopped" in final and "long-run.safetensors" in final
    table, _ = client.predict(api_name="/list_adapters")
    assert "long-run" in [row[0] for row in table["data"]]


def test_user_errors_read_as_messages_not_tracebacks(client, served, images):
    _, table = client.predict([handle_file(f) for f in images], api_name="/upload_images")
    with pytest.raises(AppError, match="must be a plain file name") as bad_name:
        client.predict(**train_args(images, table, "a/b"), api_name="/train")
    assert "Traceback" not in str(bad_name.value)
    missing = served.studio.work_dir / "no-such-reg-folder"
    with pytest.raises(AppError, match=f"regularisation images folder {missing} does not exist"):
        client.predict(
            **train_args(images, table, "with-reg", regularization_images=str(missing)), api_name="/train"
        )
    with pytest.raises(AppError, match="concept images"):
        client.predict(**{**train_args(images, table, "x"), "files": []}, api_name="/train")
    with pytest.raises(AppError, match="no adapter named"):
        client.predict(prompt="p", steps=1, adapter_1="missing", api_name="/generate")
    with pytest.raises(AppError, match="no adapter named"):
        client.predict("missing", "kohya", api_name="/export_adapter")


def test_a_run_that_fails_says_why_in_its_progress(client, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    final_summary = train_and_watch(client, [str(broken)], "broken-run")[-1][0]
    assert "failed" in final_summary and "not a readable image" in final_summary
    assert "Traceback" not in final_summary


def test_import_rename_delete(client, tiny_config, tmp_path):
    from sdlora.library.store import AdapterLibrary
    from sdlora.training.loop import train

    trained = train(tiny_config.replace(name="from-elsewhere")).adapter_path
    copy = AdapterLibrary(trained.parent).export("from-elsewhere", "kohya", tmp_path / "kohya")
    table, _, name, _ = client.predict(handle_file(str(copy)), "", api_name="/import_adapter")
    assert name == "from-elsewhere" and "from-elsewhere" in [r[0] for r in table["data"]]
    table, _, name, _ = client.predict("from-elsewhere", "renamed", api_name="/rename_adapter")
    assert name == "renamed" and "from-elsewhere" not in [r[0] for r in table["data"]]
    table, _, name = client.predict("renamed", api_name="/delete_adapter")
    assert "renamed" not in [r[0] for r in table["data"]]
    with pytest.raises(AppError, match="not a"):
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(b"not a safetensors file at all")
        client.predict(handle_file(str(bad)), "", api_name="/import_adapter")
    import torch
    from safetensors.torch import save_file

    dora = tmp_path / "dora.safetensors"
    save_file(
        {
            "lora_unet_x.lora_down.weight": torch.zeros(2, 4),
            "lora_unet_x.lora_up.weight": torch.zeros(4, 2),
            "lora_unet_x.dora_scale": torch.ones(1, 4),
        },
        str(dora),
    )
    with pytest.raises(AppError, match="dora.safetensors is a DoRA adapter") as refused:
        client.predict(handle_file(str(dora)), "", api_name="/import_adapter")
    assert "\n" not in str(refused.value).strip()


def test_settings_show_model_device_and_folders(client, served):
    text = client.predict(api_name="/settings")
    assert "loaded" in text and "cpu" in text and str(served.studio.adapters_dir) in text


def test_missing_base_model_still_starts_and_says_why(tmp_path):
    studio = Studio(str(tmp_path / "no-such-model"), tmp_path / "adapters", tmp_path / "concepts")
    with serving(studio) as server:
        text = Client(server.url, verbose=False).predict(api_name="/settings")
    assert "not loaded" in text and "does not exist" in text


def test_auth_keeps_strangers_out(tmp_path):
    studio = Studio(str(tmp_path / "none"), tmp_path / "adapters", tmp_path / "concepts")
    with serving(studio, auth=("me", "secret")) as server:
        assert "Base model" in Client(server.url, auth=("me", "secret"), verbose=False).predict(
            api_name="/settings"
        )
        with pytest.raises(Exception):  # noqa: B017 - gradio_client raises a plain error for a refused login
            Client(server.url, auth=("me", "wrong"), verbose=False)


def test_flags():
    args = app.parse_args(
        ["--port", "9000", "--auth", "me:secret", "--share", "--base-model", "x", "--adapters-dir", "y"]
    )
    assert (args.host, args.port, args.auth, args.share, args.base_model, args.adapters_dir) == (
        "127.0.0.1",
        9000,
        "me:secret",
        True,
        "x",
        "y",
    )
    assert app.parse_args([]).base_model == str(REPO / "assets" / "demo-model")  # wherever the app starts
    with pytest.raises(SystemExit):
        app.parse_args(["--auth", "no-colon"])


def torch_imported_after(*steps: str) -> list[bool]:
    """Run the steps in turn in a fresh interpreter; whether torch was imported after each one."""
    check = "print('torch imported:', 'torch' in sys.modules)"
    code = "; ".join(["import sys", *(f"{step}; {check}" for step in steps)])
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    answers = [
        line.split(": ")[1] == "True"
        for line in out.stdout.splitlines()
        if line.startswith("torch imported:")
    ]
    assert len(answers) == len(steps), out.stdout
    return answers


def test_importing_the_app_and_building_the_page_do_not_import_torch(tmp_path):
    # One interpreter for both: each start costs seconds of imports.
    imported, built = torch_imported_after(
        "import app", f"from sdlora.ui.studio import Studio; app.build_app(Studio('none', {str(tmp_path)!r}))"
    )
    assert not imported and not built


def test_the_studios_own_work_folder_goes_at_exit_and_a_given_one_stays(tmp_path):
    own = Studio(str(tmp_path / "none"), tmp_path / "adapters", tmp_path / "concepts")
    (own.work_dir / "images").mkdir()
    given = Studio(
        str(tmp_path / "none"), tmp_path / "adapters", tmp_path / "concepts", work_dir=tmp_path / "work"
    )
    (tmp_path / "adapters").mkdir(exist_ok=True)
    (tmp_path / "adapters" / "keep.safetensors").write_bytes(b"adapter")
    assert own.work_dir.is_dir() and given.remove_work_dir is None
    own.remove_work_dir()  # what interpreter exit runs
    assert not own.work_dir.exists() and given.work_dir.is_dir()
    assert (tmp_path / "adapters" / "keep.safetensors").exists()


def test_the_train_tab_trains_and_generates_on_an_sdxl_base(tiny_sdxl_model, tmp_path, images):
    """The same tab and API over an SDXL base: the adapter is SDXL's, and generation uses it."""
    studio = Studio(
        str(tiny_sdxl_model), tmp_path / "adapters", tmp_path / "concepts", work_dir=tmp_path / "work"
    )
    with serving(studio) as server:
        client = Client(server.url, verbose=False)
        outputs = train_and_watch(client, images, "xl-circles", steps=3, preview_every=0)
        assert "finished" in outputs[-1][0], outputs[-1][0]
        from sdlora.library.formats import read_metadata

        header = read_metadata(tmp_path / "adapters" / "xl-circles.safetensors")
        assert header["ss_base_model_version"] == "sdxl_base_v1-0" and header["sdlora.family"] == "sdxl"
        gallery, parameters, _ = client.predict(
            prompt="sks, a circle",
            seed=5,
            steps=2,
            guidance=5.0,
            scheduler="Euler",
            adapter_1="xl-circles",
            api_name="/generate",
        )
        assert len(gallery) == 1 and "<lora:xl-circles:1>" in parameters and "Size: 32x32" in parameters
        assert "sdxl" in client.predict(api_name="/settings").lower()
