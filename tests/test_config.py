"""Settings: one source of defaults, strict files, clear messages."""

from __future__ import annotations

import pytest

from sdlora.config import DataConfig, LoraSpec, TrainConfig
from sdlora.errors import ConfigError


def valid() -> TrainConfig:
    return TrainConfig(base_model="m", data=DataConfig(images="d"))


def test_json_roundtrip_is_exact(tmp_path):
    config = valid().replace(steps=77, lora=LoraSpec(rank=16, alpha=4.5), preview_prompts=("a", "b"))
    path = tmp_path / "c.json"
    path.write_text(config.to_json())
    assert TrainConfig.from_file(path) == config


@pytest.mark.parametrize(
    "values, message",
    [
        ({"stpes": 1}, "unknown setting"),
        ({"lora": {"rnak": 4}}, "unknown setting.*rnak"),
        ({"steps": "ten"}, "steps must be int"),
        ({"lora": 5}, "lora must be a table"),
        ({"learning_rate": True}, "must be float"),
    ],
)
def test_bad_values_fail_loudly(values, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict(values)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"steps": 0}, "steps must be a whole number from 1 to"),
        ({"name": "../x"}, "plain file name"),
        ({"base_model": ""}, "no base model"),
        ({"learning_rate": 0.0}, "learning_rate must be a number from 1e-08 to 10, got 0.0"),
        ({"lora": LoraSpec(rank=0)}, "rank must be a whole number from 1 to"),
        ({"data": DataConfig(images="d", resolution=30)}, "multiple of 8"),
        ({"data": DataConfig(images="")}, "no concept images"),
    ],
)
def test_validation_messages(change, message):
    with pytest.raises(ConfigError, match=message):
        valid().replace(**change).validate()


def test_unreadable_config_file_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="broken.json is not valid json"):
        TrainConfig.from_file(path)
