"""``simulate --profiles CLASS[:SIZE],...``: parsing, and the flags the client processes get.

The fleet test starts real ``join`` processes (as ``simulate`` does) against a port where no
broker listens: each applies its cap and says so before it tries to connect, and a client
that stops on an error gets an outcome with its exit status and error line, not "missing".
"""

from __future__ import annotations

import dataclasses

import pytest

from coordinator.settings import RunConfig
from coordinator.simulate import (
    SIMULATION_MAX_WAIT_SECONDS,
    ClientFleet,
    ClientProfile,
    SimulationOptions,
    bounded_wait,
    parse_client_profile,
    precisions_for_profiles,
)
from hardware_profiles.profile import GIB, load_catalog
from shared.errors import BrokerError, ConfigError, InsufficientMemoryError
from shared.signing import SigningKey

MIB = 1 << 20


def test_an_entry_with_a_size_gives_that_cap():
    assert parse_client_profile("jetson-orin-nano-8gb:1.5GiB") == ClientProfile("jetson-orin-nano-8gb", 3 << 29)
    assert parse_client_profile(" cpu-8gb : 800MiB ") == ClientProfile("cpu-8gb", 800 * MIB)


def test_an_entry_without_a_size_is_capped_at_the_class_memory_less_its_reserved_part():
    rtx = load_catalog().get("rtx-3060-12gb")
    assert parse_client_profile("rtx-3060-12gb") == ClientProfile("rtx-3060-12gb", int(11.5 * GIB))
    assert rtx.usable_bytes == rtx.memory_bytes - rtx.reserved_bytes == int(11.5 * GIB)


def test_a_class_without_4bit_kernels_gets_bf16_packages_published():
    config = RunConfig()
    assert config.pruning.precision == "nf4" and config.pruning.extra_precisions == []
    played = [parse_client_profile("cpu-8gb:1GiB"), parse_client_profile("jetson-orin-nano-8gb:2GiB")]
    extended, note = precisions_for_profiles(config, played)
    assert extended.pruning.extra_precisions == ["bf16"] and extended.pruning.precision == "nf4"
    assert note == "jetson-orin-nano-8gb cannot run nf4 packages: every tier is also published in bf16 (pruning.extra_precisions)"
    assert config.pruning.extra_precisions == []  # the caller's config is not changed


def test_no_precision_is_added_where_every_class_runs_nf4_or_a_runnable_one_is_published():
    config = RunConfig()
    assert precisions_for_profiles(config, [parse_client_profile("rtx-3060-12gb:2GiB")]) == (config, "")
    assert precisions_for_profiles(config, []) == (config, "")
    nano = [parse_client_profile("jetson-orin-nano-8gb:2GiB")]
    chosen = dataclasses.replace(config, pruning=dataclasses.replace(config.pruning, extra_precisions=["fp32"]))
    assert precisions_for_profiles(chosen, nano) == (chosen, "")  # the user's choice stands
    bf16 = dataclasses.replace(config, pruning=dataclasses.replace(config.pruning, precision="bf16"))
    assert precisions_for_profiles(bf16, nano) == (bf16, "")


def test_a_simulation_waits_for_missing_clients_a_bounded_time_unless_told_otherwise():
    config = RunConfig()
    assert config.rounds.max_wait_s is None
    assert bounded_wait(config).rounds.max_wait_s == SIMULATION_MAX_WAIT_SECONDS
    chosen = dataclasses.replace(config, rounds=dataclasses.replace(config.rounds, max_wait_s=30.0))
    assert bounded_wait(chosen) is chosen


def test_the_client_is_given_both_flags():
    played = parse_client_profile("cpu-8gb:1.2GiB")
    assert played.join_args() == ["--profile", "cpu-8gb", "--memory-limit", str(int(1.2 * GIB))]
    assert played.describe() == "cpu-8gb under 1.20 GiB"


@pytest.mark.parametrize("entry, words", [
    ("pi-zero:1GiB", "unknown device class 'pi-zero'; known classes: cpu-16gb, cpu-32gb, cpu-8gb"),
    ("cpu-8gb:lots", "--profiles cpu-8gb: size 'lots' is not a size"),
    ("cpu-8gb:2GB", "'GB' is ambiguous"),
    (":1GiB", "names no device class"),
])
def test_bad_entries_are_config_errors(entry, words):
    with pytest.raises(ConfigError) as info:
        parse_client_profile(entry)
    assert words in str(info.value)


def test_options_refuse_a_bad_entry_before_anything_starts():
    with pytest.raises(ConfigError, match="unknown device class 'nope'"):
        SimulationOptions(clients=2, profiles=("cpu-8gb:1GiB", "nope"))
    options = SimulationOptions(clients=3, profiles=("cpu-8gb:1GiB", "jetson-orin-nano-8gb"))
    assert [p.device_class for p in options.client_profiles()] == ["cpu-8gb", "jetson-orin-nano-8gb"]
    assert SimulationOptions().client_profiles() == []


def test_the_fleet_starts_capped_clients_and_reports_a_failed_one_with_its_error(tmp_path):
    options = SimulationOptions(clients=2, profiles=("jetson-orin-nano-8gb:1.5GiB", "cpu-8gb:64MiB"))
    data = []
    for i in range(2):
        path = tmp_path / "clients" / f"client-{i}" / "data.jsonl"
        path.parent.mkdir(parents=True)
        path.write_text('{"text": "fine", "label": 1}\n')
        data.append(path)
    fleet = ClientFleet(RunConfig(), options, data, tmp_path, SigningKey.generate().public.text)
    try:
        fleet.start("127.0.0.1", 1)  # no broker there
        outcomes = fleet.wait(120.0)
    finally:
        fleet.stop()
    played, starved = outcomes
    log = " ".join((tmp_path / "clients" / "client-0" / "client.log").read_text().split())
    assert "memory cap 1.50 GiB on the whole process (RLIMIT_DATA)" in log
    assert "jetson-orin-nano-8gb, cpu, 1.5 GiB free" in log
    assert played["status"] == "failed" and played["reason"].startswith(f"exited with status {BrokerError.exit_code}: error:")
    assert starved["status"] == "failed"
    assert starved["reason"].startswith(f"exited with status {InsufficientMemoryError.exit_code}: error: memory cap of 64.00 MiB is below the ")
