"""The command lines as a user meets them: help, bad input, clear errors and exit codes."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from coordinator.cli import app as coordinator_app
from edge_client.cli import app as client_app
from shared.broker import free_port
from shared.console import parse_broker_address
from shared.errors import ConfigError
from shared.signing import SigningKey

runner = CliRunner()
PINNED = ["--coordinator-key", SigningKey.generate().public.text]
"""A coordinator key for joins that fail on something else (a join without one stops at once)."""


# The CLI configures root logging for a terminal; the fixture puts it back for the tests that follow.
pytestmark = pytest.mark.usefixtures("restore_logging")


def test_both_apps_list_their_commands():
    coordinator = runner.invoke(coordinator_app, ["--help"])
    assert coordinator.exit_code == 0
    for command in ("serve", "simulate", "report", "prune", "profiles"):
        assert command in coordinator.output
    client = runner.invoke(client_app, ["--help"])
    assert client.exit_code == 0
    for command in ("join", "probe"):
        assert command in client.output


def test_serve_with_an_unknown_config_key_exits_2_naming_the_key(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('[training]\nlocal_stepz = 3\n[pruning]\nstrategy = "fedx"\n')
    result = runner.invoke(coordinator_app, ["serve", "--config", str(config), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == ConfigError.exit_code
    assert "training.local_stepz" in result.output
    assert "pruning.strategy" in result.output and "method = \"fedsoda\"" in result.output  # where it went


def test_serve_with_an_unknown_method_or_aggregation_exits_2_before_any_work(tmp_path):
    for flag, value, expected in (("--method", "fedx", "method must be one of fedsoda, fedot, fedpetuning"),
                                  ("--aggregation", "krum2", "unknown aggregation strategy 'krum2'; choose one of fedavg")):
        result = runner.invoke(coordinator_app, ["serve", flag, value, "--run-dir", str(tmp_path / "run")])
        assert result.exit_code == ConfigError.exit_code, result.output
        assert expected in result.output
        assert not (tmp_path / "run" / "tiers.json").exists()


def test_serve_with_a_missing_config_file_exits_2(tmp_path):
    result = runner.invoke(coordinator_app, ["serve", "--config", str(tmp_path / "nope.toml")])
    assert result.exit_code == 2
    assert "does not exist" in result.output


def test_join_with_a_missing_data_file_exits_9(tmp_path):
    result = runner.invoke(client_app, ["join", "--data", str(tmp_path / "missing.jsonl"), "--broker", "127.0.0.1:1", *PINNED])
    assert result.exit_code == 9
    assert "missing.jsonl" in result.output


def test_join_with_no_broker_listening_exits_5(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": "fine film", "label": 1}) + "\n")
    port = free_port()  # nothing listens there
    result = runner.invoke(
        client_app,
        ["join", "--data", str(data), "--broker", f"127.0.0.1:{port}", "--client-id", "c1", "--state-dir", str(tmp_path / "s"), *PINNED],
    )
    assert result.exit_code == 5
    assert f"127.0.0.1:{port}" in result.output


def test_join_with_a_bad_broker_address_exits_2(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": "fine film", "label": 1}) + "\n")
    result = runner.invoke(client_app, ["join", "--data", str(data), "--broker", "host:notaport", *PINNED])
    assert result.exit_code == 2
    assert "notaport" in result.output


def test_report_of_a_folder_that_is_no_run_exits_10(tmp_path):
    result = runner.invoke(coordinator_app, ["report", str(tmp_path)])
    assert result.exit_code == 10
    assert "report.json" in result.output


@pytest.mark.parametrize(
    "address, expected",
    [
        ("127.0.0.1:1883", ("127.0.0.1", 1883)),
        ("broker.local", ("broker.local", 1883)),
        ("[::1]:8883", ("::1", 8883)),
        ("::1", ("::1", 1883)),
    ],
)
def test_broker_addresses(address, expected):
    assert parse_broker_address(address) == expected


@pytest.mark.parametrize("address", [":1883", "host:0", "host:99999", "host:x"])
def test_bad_broker_addresses_are_refused(address):
    with pytest.raises(ConfigError):
        parse_broker_address(address)


def test_serve_with_an_open_embedded_broker_exits_2_before_any_work(tmp_path):
    result = runner.invoke(
        coordinator_app, ["serve", "--broker-mode", "embedded", "--broker", "0.0.0.0:1883", "--run-dir", str(tmp_path / "run")]
    )
    assert result.exit_code == ConfigError.exit_code, result.output
    text = " ".join(result.output.split())  # rich wraps long lines
    assert "loopback only" in text and 'broker mode "mosquitto"' in text and "credentials" in text
    assert not (tmp_path / "run").exists()


def test_serve_shows_the_signing_key_it_keeps_in_the_run_dir_or_where_told(tmp_path):
    # An unknown strategy stops serve right after the banner, before any model work.
    base = ["serve", "--broker-mode", "embedded", "--aggregation", "no-such-strategy"]
    first = runner.invoke(coordinator_app, [*base, "--run-dir", str(tmp_path / "run")])
    assert first.exit_code == ConfigError.exit_code, first.output
    pub = (tmp_path / "run" / "coordinator.pub").read_text().strip()
    assert pub.startswith("ed25519:") and f"clients pin {pub}" in " ".join(first.output.split())
    again = runner.invoke(coordinator_app, [*base, "--run-dir", str(tmp_path / "run")])
    assert f"clients pin {pub}" in " ".join(again.output.split())  # the same key when the run goes on
    chosen = tmp_path / "keys" / "mine.key"
    other = runner.invoke(coordinator_app, [*base, "--run-dir", str(tmp_path / "run2"), "--signing-key", str(chosen)])
    own = (tmp_path / "keys" / "coordinator.pub").read_text().strip()
    assert own != pub and f"clients pin {own}" in " ".join(other.output.split())
    assert not (tmp_path / "run2" / "coordinator.key").exists()
