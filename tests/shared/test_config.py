"""Config loading: defaults < TOML < FEDSODA_* environment < overrides; strict; all problems at once."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from shared.config import env_var_name, load_config
from shared.errors import ConfigError
from shared.transport_types import TransportConfig


@dataclass(frozen=True)
class Rounds:
    local_steps: int = 10
    learning_rate: float = 2e-4
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])

    def __post_init__(self) -> None:
        if self.local_steps < 1:
            raise ValueError(f"local_steps must be at least 1, got {self.local_steps}")


@dataclass(frozen=True)
class AppConfig:
    run: str = "demo"
    seed: int = 0
    mode: Literal["fedavg", "fedprox"] = "fedavg"
    output: Path | None = None
    rounds: Rounds = field(default_factory=Rounds)
    broker: TransportConfig = field(default_factory=TransportConfig)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fedsoda.toml"
    path.write_text(text)
    return path


def test_defaults_only() -> None:
    assert load_config(AppConfig, env={}) == AppConfig()


def test_toml_nested_tables(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
run = "exp1"
output = "out/dir"
[rounds]
local_steps = 3
learning_rate = 1   # an int where a float is expected is fine
[broker]
host = "10.0.0.2"
port = 8883
ca_file = "ca.pem"
protocol = "3.1.1"
""",
    )
    cfg = load_config(AppConfig, path, env={})
    assert cfg.run == "exp1" and cfg.output == Path("out/dir")
    assert cfg.rounds == Rounds(local_steps=3, learning_rate=1.0)
    assert cfg.broker.host == "10.0.0.2" and cfg.broker.port == 8883 and cfg.broker.ca_file == Path("ca.pem")
    assert cfg.broker.protocol == "3.1.1" and cfg.broker.keepalive == TransportConfig().keepalive


def test_precedence_defaults_toml_env_overrides(tmp_path: Path) -> None:
    path = _write(tmp_path, "seed = 1\n[rounds]\nlocal_steps = 2\nlearning_rate = 0.5\n")
    env = {
        "FEDSODA_ROUNDS__LOCAL_STEPS": "4",
        "FEDSODA_SEED": "5",
        "FEDSODA_ROUNDS__TARGET_MODULES": "q_proj, k_proj,v_proj",
        "FEDSODA_BROKER__PERSISTENT": "no",
        "FEDSODA_OUTPUT": "none",
        "FEDSODA_CACHE": "/somewhere",  # a FEDSODA_ variable that is no config field is ignored
    }
    cfg = load_config(AppConfig, path, env=env, overrides={"seed": 9, "rounds.learning_rate": "0.25", "run": None})
    assert cfg.seed == 9  # override beats env beats TOML
    assert cfg.rounds.local_steps == 4  # env beats TOML
    assert cfg.rounds.learning_rate == 0.25  # override (a string flag value is parsed)
    assert cfg.rounds.target_modules == ["q_proj", "k_proj", "v_proj"]
    assert cfg.broker.persistent is False and cfg.output is None
    assert cfg.run == "demo"  # None override = flag not given


def test_env_names_follow_the_documented_convention() -> None:
    assert env_var_name("rounds.local_steps") == "FEDSODA_ROUNDS__LOCAL_STEPS"
    assert env_var_name("seed") == "FEDSODA_SEED"
    cfg = load_config(AppConfig, env={"FEDSODA_ROUNDS__TARGET_MODULES": '["a", "b"]'})
    assert cfg.rounds.target_modules == ["a", "b"]


def test_all_problems_reported_at_once_with_paths_and_sources(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
sed = 3
mode = "sgd"
[rounds]
local_steps = "many"
lr = 0.1
[broker]
port = 1883.5
""",
    )
    env = {"FEDSODA_SEED": "abc", "FEDSODA_BROKER__KEEPALIVE": "30"}
    with pytest.raises(ConfigError) as info:
        load_config(AppConfig, path, env=env, overrides={"rounds.nope": 1})
    text = str(info.value)
    for fragment in (
        "sed: unknown key",
        "rounds.lr: unknown key",
        "mode: must be one of ['fedavg', 'fedprox']",
        "rounds.local_steps: expected int",
        "broker.port: expected int",
        "seed: invalid literal for int() with base 10: 'abc' [FEDSODA_SEED]",
        "rounds.nope: unknown option",
        f"[file {path}]",
    ):
        assert fragment in text, f"{fragment!r} missing from:\n{text}"
    assert text.startswith("7 problem(s)")


def test_dataclass_validation_is_reported_as_a_problem() -> None:
    with pytest.raises(
        ConfigError, match=r"rounds: local_steps must be at least 1, got 0 \[FEDSODA_ROUNDS__LOCAL_STEPS\]"
    ):
        load_config(AppConfig, env={"FEDSODA_ROUNDS__LOCAL_STEPS": "0"})


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(AppConfig, _write(tmp_path, "run = \n"), env={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(AppConfig, tmp_path / "absent.toml", env={})


def test_a_table_where_a_value_belongs_and_vice_versa(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(AppConfig, _write(tmp_path, "rounds = 3\n[seed]\nx = 1\n"), env={})
    assert "rounds: expected a map for Rounds" in str(info.value)
    assert "seed: expected int" in str(info.value)


def test_bad_boolean_in_env() -> None:
    with pytest.raises(ConfigError, match="cannot read 'maybe' as a boolean"):
        load_config(AppConfig, env={"FEDSODA_BROKER__PERSISTENT": "maybe"})
