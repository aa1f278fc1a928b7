"""The pieces every stage shares: atomic folders, the run layout, the registry URI parser, library versions."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from domaintune.errors import UserError
from domaintune.layout import RunLayout
from domaintune.registry.uri import RegistryRef, is_registry_uri, parse_registry_uri
from domaintune.utils.io import atomic_dir, remove_stale_staging
from domaintune.utils.versions import library_versions


def test_atomic_dir_replaces_a_folder_whole(tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_dir(target) as staging:
        assert staging.parent == tmp_path and staging != target
        (staging / "new.txt").write_text("new")
        assert (target / "old.txt").is_file(), "readers still see the old folder while the new one is built"
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"], "no staging or old folder left behind"


def test_atomic_dir_keeps_the_old_folder_when_the_body_fails(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights").write_text("v1")
    with pytest.raises(RuntimeError), atomic_dir(target) as staging:
        (staging / "weights").write_text("half")
        raise RuntimeError("killed mid-save")
    assert (target / "weights").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_atomic_dir_keep_mode_leaves_a_published_cache_alone(tmp_path):
    target = tmp_path / "cache"
    with atomic_dir(target, if_exists="keep") as staging:
        (staging / "a").write_text("first")
    with atomic_dir(target, if_exists="keep") as staging:
        (staging / "a").write_text("second")
    assert (target / "a").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_remove_stale_staging_spares_live_processes(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".export.staging-{dead_pid}-abc"
    live = tmp_path / f".export.staging-{os.getpid()}-def"
    stale.mkdir()
    live.mkdir()
    assert remove_stale_staging(tmp_path, "export") == [stale]
    assert live.is_dir() and not stale.exists()


def test_run_layout_names_each_path_once(tmp_path):
    layout = RunLayout(tmp_path)
    assert layout.train_file == tmp_path / "data" / "train.jsonl"
    assert layout.split_file("test") == layout.test_file
    assert layout.eval_report.parent == layout.eval_dir
    assert layout.relative(layout.export_manifest) == "export/manifest.json"
    assert RunLayout.of(str(tmp_path)) == layout and RunLayout.of(layout) is layout
    with pytest.raises(ValueError, match="unknown split"):
        layout.split_file("dev")


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("registry://med@production", RegistryRef("med", "production")),
        ("registry://med@v1.2.3", RegistryRef("med", "v1.2.3")),
        ("registry://med@v1.2.3/export/gguf", RegistryRef("med", "v1.2.3", "export/gguf")),
    ],
)
def test_registry_uri_round_trips(uri, expected):
    ref = parse_registry_uri(uri)
    assert ref == expected and str(ref) == uri and is_registry_uri(uri)


@pytest.mark.parametrize("uri", ["registry://med", "registry://@prod", "registry://med@", "runs/med", "med@prod"])
def test_malformed_registry_uris_say_the_expected_form(uri):
    with pytest.raises(UserError, match=r"registry://name@alias"):
        parse_registry_uri(uri)


@pytest.mark.parametrize("name", ["../etc", "a b", "é中文", "tiny\n", "x..y"])
def test_registry_names_follow_the_one_model_name_pattern(name):
    """The same rule as the serve config and the API (utils/names.py): safe as a folder and a header."""
    from domaintune.config import ConfigError, config_from_dict

    with pytest.raises(UserError, match="not a valid model name"):
        parse_registry_uri(f"registry://{name}@production")
    with pytest.raises(ConfigError, match=r"registry\.name"):
        config_from_dict({"name": "p", "registry": {"name": name}})


def test_library_versions_lists_installed_packages_only():
    versions = library_versions(("domaintune", "no-such-package-xyz"))
    assert set(versions) == {"python", "domaintune"}
