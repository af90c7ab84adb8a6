"""The client's last check before downloading: does the assigned tier fit the memory free now?

The device is a measured profile with its memory set by hand (a Jetson cannot be had here):
the same tier fits a roomy box and is refused, with both numbers, on a crowded one.
"""

from __future__ import annotations

import dataclasses
import json

from edge_client.preflight import preflight
from hardware_profiles.detect import detect_profile
from hardware_profiles.planner import PlannerOptions, plan_for_profile
from shared.protocol import Manifest

GIB = 2**30


def _manifest(model_dir) -> Manifest:
    config = json.loads((model_dir / "config.json").read_text())
    return Manifest(blob_id="0" * 64, name="m", version=1, tier="L4", chunk_size=4 * 2**20, files=[],
                    meta={"layer_map": [0, 1, 2, 3], "model_config": config})


def test_a_tier_that_fits_now_passes_and_one_that_does_not_is_refused_with_numbers(tiny_model_dir, monkeypatch):
    # Preflight adds this process's resident set back to the free memory; in a test session
    # that depends on what ran before, so pin it to a client-sized 400 MiB.
    monkeypatch.setattr("edge_client.preflight.process_rss_bytes", lambda: 400 * 2**20)
    manifest = _manifest(tiny_model_dir)
    roomy = dataclasses.replace(detect_profile(override="cpu-16gb"), accelerator="cpu", available_memory_bytes=12 * GIB)
    plan = plan_for_profile(manifest.meta["model_config"], [], roomy, options=PlannerOptions(precisions=("fp32",))).to_dict()
    ok = preflight(manifest, plan, roomy)
    assert ok.fits and ok.estimate_bytes < ok.budget_bytes

    # Other programs took the memory since the coordinator planned: refuse before downloading.
    crowded = dataclasses.replace(roomy, available_memory_bytes=64 * 2**20)
    refused = preflight(manifest, plan, crowded)
    assert not refused.fits
    assert "does not fit" in refused.reason and "smaller tier" in refused.reason
    assert refused.budget_bytes < refused.estimate_bytes
