"""The device catalog: the shipped classes and strict validation of broken files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hardware_profiles.profile import CATALOG_DIR, load_catalog, load_device_class
from shared.errors import ConfigError

REQUIRED = {
    "jetson-orin-nano-8gb", "jetson-orin-nx-16gb", "jetson-agx-orin-32gb", "jetson-agx-orin-64gb",
    "jetson-xavier-nx-8gb", "rtx-3060-12gb", "rtx-4060-8gb", "rtx-4090-24gb", "nvidia-l4-24gb",
    "cpu-8gb", "cpu-16gb", "cpu-32gb",
}


def test_shipped_catalog_has_the_device_classes_the_issue_lists() -> None:
    catalog = load_catalog()
    assert REQUIRED <= set(catalog.names)
    for cls in catalog:
        assert 0 < cls.budget_bytes() < cls.memory_bytes
        assert cls.sustained_tflops <= cls.peak_tflops
        assert cls.sources, f"{cls.name} cites no source for its figures"


def test_jetson_classes_share_memory_and_orin_lacks_4bit() -> None:
    catalog = load_catalog()
    for cls in catalog.of_kind("jetson"):
        assert cls.unified_memory and cls.accelerator == "cuda"
        assert cls.supports_4bit is False  # the sm_87 / L4T gap of bitsandbytes' PyPI wheels
    assert catalog.get("jetson-orin-nano-8gb").compute_capability == "8.7"
    assert catalog.get("jetson-xavier-nx-8gb").supports_bf16 is False
    assert catalog.get("rtx-3060-12gb").supports_4bit is True


def test_catalog_memory_ordering_is_real() -> None:
    catalog = load_catalog()
    budgets = [catalog.get(n).budget_bytes() for n in ("cpu-8gb", "cpu-16gb", "cpu-32gb")]
    assert budgets == sorted(budgets)
    assert catalog.get("jetson-agx-orin-64gb").budget_bytes() > catalog.get("jetson-agx-orin-32gb").budget_bytes()


def _broken_copy(tmp_path: Path, edit) -> Path:
    src = CATALOG_DIR / "rtx-3060-12gb.toml"
    dst = tmp_path / "rtx-3060-12gb.toml"
    dst.write_text(edit(src.read_text()))
    return dst


def test_unknown_key_names_the_file_and_the_key(tmp_path: Path) -> None:
    bad = _broken_copy(tmp_path, lambda t: t + "\nmemory_gb = 12\n")
    with pytest.raises(ConfigError) as err:
        load_device_class(bad)
    assert str(bad) in str(err.value) and "memory_gb" in str(err.value) and "unknown" in str(err.value)


def test_missing_key_names_the_file_and_the_key(tmp_path: Path) -> None:
    bad = _broken_copy(tmp_path, lambda t: "\n".join(l for l in t.splitlines() if not l.startswith("safety_margin")))
    with pytest.raises(ConfigError) as err:
        load_device_class(bad)
    assert str(bad) in str(err.value) and "safety_margin" in str(err.value) and "missing" in str(err.value)


def test_wrong_type_and_out_of_range_values_are_reported(tmp_path: Path) -> None:
    bad = _broken_copy(tmp_path, lambda t: t.replace('supports_4bit = true', 'supports_4bit = "yes"'))
    with pytest.raises(ConfigError, match="supports_4bit"):
        load_device_class(bad)
    bad = _broken_copy(tmp_path, lambda t: t.replace("safety_margin = 0.10", "safety_margin = 1.5"))
    with pytest.raises(ConfigError, match=r"safety_margin must be in \[0, 0.9\)"):
        load_device_class(bad)
    bad = _broken_copy(tmp_path, lambda t: t.replace('compute_capability = "8.6"', 'compute_capability = "sm86"'))
    with pytest.raises(ConfigError, match="compute_capability"):
        load_device_class(bad)


def test_name_must_match_the_file_name(tmp_path: Path) -> None:
    bad = tmp_path / "my-gpu.toml"
    bad.write_text((CATALOG_DIR / "rtx-3060-12gb.toml").read_text())
    with pytest.raises(ConfigError, match="must equal the file name 'my-gpu'"):
        load_device_class(bad)


def test_invalid_toml_and_bad_folders(tmp_path: Path) -> None:
    bad = tmp_path / "broken.toml"
    bad.write_text("name = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_device_class(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_catalog([tmp_path / "nowhere"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="holds no"):
        load_catalog([empty])


def test_every_broken_file_is_reported_at_once(tmp_path: Path) -> None:
    folder = tmp_path / "cat"
    folder.mkdir()
    (folder / "a.toml").write_text("name = 'a'\n")
    (folder / "b.toml").write_text("name = \n")
    with pytest.raises(ConfigError) as err:
        load_catalog([folder])
    assert "a.toml" in str(err.value) and "b.toml" in str(err.value)


def test_user_classes_extend_the_catalog_and_duplicates_are_refused(tmp_path: Path) -> None:
    extra = tmp_path / "extra"
    extra.mkdir()
    text = (CATALOG_DIR / "rtx-3060-12gb.toml").read_text()
    text = text.replace('name = "rtx-3060-12gb"', 'name = "rtx-3060-8gb"').replace("memory_gib = 12.0", "memory_gib = 8.0")
    (extra / "rtx-3060-8gb.toml").write_text(text)
    catalog = load_catalog([CATALOG_DIR, extra])
    assert catalog.get("rtx-3060-8gb").memory_gib == 8.0
    shutil.copy(CATALOG_DIR / "cpu-8gb.toml", extra / "cpu-8gb.toml")
    with pytest.raises(ConfigError, match="defined twice"):
        load_catalog([CATALOG_DIR, extra])


def test_unknown_class_name_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as err:
        load_catalog().get("rtx-9090")
    assert "rtx-9090" in str(err.value) and "rtx-3060-12gb" in str(err.value)
