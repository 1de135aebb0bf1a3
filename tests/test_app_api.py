"""The app's API as a script sees it: named parameters, the README's example, a shared server's limits,
and many open progress streams that must not stall Stop or generation."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from app_server import REPO, serving
from conftest import draw_concept

pytest.importorskip("sdlora.generation.generate", reason="the app needs sdlora.generation.generate")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

sys.path.insert(0, str(REPO))
import app  # noqa: E402
from sdlora.ui.studio import Studio  # noqa: E402


@pytest.fixture(scope="module")
def served(tiny_app):
    """The app on the tiny model, assets/concepts as its concepts folder (conftest's shared server)."""
    return tiny_app


@pytest.fixture()
def client(served):
    return Client(served.url, verbose=False)


def test_every_api_parameter_has_a_real_name(client):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    names = {api: [p["parameter_name"] for p in info["parameters"]] for api, info in endpoints.items()}
    unnamed = {
        api: params for api, params in names.items() if any(re.fullmatch(r"param_\d+", p) for p in params)
    }
    assert not unnamed, unnamed
    assert {"files", "captions", "config", "rank", "alpha", "steps", "seed", "trigger_word"} <= set(
        names["/train"]
    )
    assert {"prompt", "negative_prompt", "seed", "adapter_1", "weight_1", "comparison_grid"} <= set(
        names["/generate"]
    )


def test_the_readme_client_example_runs(served, monkeypatch):
    """The README's example as written; only the address and the run's length (600 steps) are changed."""
    readme = (REPO / "README.md").read_text()
    code = next(
        block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "gradio_client" in block
    )
    assert '"http://127.0.0.1:7860/"' in code and '"steps": 600' in code
    code = code.replace('"http://127.0.0.1:7860/"', repr(served.url)).replace('"steps": 600', '"steps": 3')
    monkeypatch.chdir(REPO)  # the example names assets/concepts/star, as run from a checkout
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own example
    assert "**my-star**: finished, step 3/3" in scope["update"][0]
    assert len(scope["gallery"]) == 1 and "<lora:my-star:0.8>" in scope["parameters"]
    assert Path(scope["kohya_file"]).name == "my-star.safetensors"


def test_a_settings_object_is_read_like_a_config_file(client, served):
    with pytest.raises(AppError, match="unknown setting.*stpes"):
        client.predict(
            config={"name": "typo", "stpes": 3, "data": {"images": "assets/concepts/star"}}, api_name="/train"
        )
    with pytest.raises(AppError, match="lora: unknown setting.*rnak"):
        client.predict(
            config={"name": "typo", "lora": {"rnak": 4}, "data": {"images": "assets/concepts/star"}},
            api_name="/train",
        )
    with pytest.raises(AppError, match="steps must be int"):
        client.predict(
            config={"name": "typo", "steps": "many", "data": {"images": "assets/concepts/star"}},
            api_name="/train",
        )
    with pytest.raises(AppError, match="this server trains on"):
        client.predict(config={"name": "typo", "base_model": "other/model"}, api_name="/train")
    folder = served.studio.work_dir / "stars"  # a concept folder on the server, inside its work folder
    folder.mkdir()
    for i in range(2):
        draw_concept(folder / f"s{i}.png", i)
    client.predict(
        config={"name": "from-folder", "steps": 2, "lora": {"rank": 2}, "data": {"images": str(folder)}},
        api_name="/train",
    )
    final = [tuple(out) for out in client.submit(api_name="/progress")][-1][0]
    assert "**from-folder**: finished, step 2/2" in final
    from sdlora.library.formats import read_metadata

    assert read_metadata(served.studio.adapters_dir / "from-folder.safetensors")["ss_network_dim"] == "2"


@pytest.mark.parametrize("folder", ["/etc", "/proc/self", "../../../../../../etc", "assets/../../../etc"])
def test_a_server_folder_outside_the_roots_is_refused_without_listing_it(client, folder):
    images = [handle_file(str(REPO / "assets" / "concepts" / "star" / "star_00.png"))]
    with pytest.raises(AppError) as refused:
        client.predict(files=images, name="sneaky", steps=2, regularization_images=folder, api_name="/train")
    message = str(refused.value)
    assert "outside the folders this server lets clients read" in message and "\n" not in message.strip()
    assert "passwd" not in message and "environ" not in message and "status" not in message
    with pytest.raises(AppError, match="outside the folders"):
        client.predict(config={"name": "sneaky", "data": {"images": folder}}, api_name="/train")


def test_the_base_model_is_limited_to_the_roots_and_fixed_on_a_shared_server(client, tmp_path):
    with pytest.raises(AppError, match="the base model /etc is outside"):
        client.predict("/etc", api_name="/load_base_model")
    shared = Studio(
        "none",
        tmp_path / "adapters",
        tmp_path / "concepts",
        access=app.access_for(app.parse_args(["--share", "--auth", "me:pw"])),
    )
    with serving(shared, auth=("me", "pw")) as server:
        with pytest.raises(AppError, match="this server is shared, so its base model is a server setting"):
            Client(server.url, auth=("me", "pw"), verbose=False).predict("x", api_name="/load_base_model")


@pytest.mark.parametrize(
    "flags, reason",
    [
        (["--share"], "gradio.live"),
        (["--host", "0.0.0.0"], "0.0.0.0"),
        (["--host", "my-box.example"], "my-box.example"),
    ],
)
def test_a_shared_server_without_auth_is_refused_with_the_reason(flags, reason, capsys):
    with pytest.raises(SystemExit) as refused:
        app.parse_args(flags)
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert reason in err and "anyone could train, generate and delete adapters" in err and "--auth" in err
    assert app.parse_args([*flags, "--no-auth"]).no_auth
    assert app.parse_args([*flags, "--auth", "me:pw"]).auth == "me:pw"
    assert not app.is_shared("127.0.0.1", False) and not app.is_shared("::1", False)
    assert not app.is_shared("localhost", False)


def test_a_hundred_open_progress_streams_leave_stop_and_generation_working(tmp_path):
    """tests/progress_streams.py, in a process of its own (see its docstring for why)."""
    import subprocess

    # os._exit after pytest: the server's daemon threads are not torn down mid-call at interpreter exit.
    script = (
        "import os, sys, pytest; code = pytest.main(sys.argv[1:]); sys.stdout.flush(); sys.stderr.flush(); "
        "os._exit(int(code))"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            "-q",
            "-p",
            "no:cacheprovider",
            "--basetemp",
            str(tmp_path / "run"),
            str(REPO / "tests" / "progress_streams.py"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "1 passed" in done.stdout
