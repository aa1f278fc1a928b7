"""The AMX probe: a build whose AMX matmul crashes, or answers otherwise once PyTorch has used AMX on the same
thread, is found in a child process and AMX stays off (the parent lives on); the verdict is cached per library
build; setup.sh's patched build runs AMX batches, before and after a PyTorch bf16 matmul, with the same logits."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

from domaintune.llamacpp import probe

pytestmark = pytest.mark.usefixtures("llamacpp_ready")


@pytest.fixture()
def fresh_probe(tmp_path, monkeypatch):
    monkeypatch.setenv("DOMAINTUNE_CACHE", str(tmp_path / "models"))
    monkeypatch.setattr(probe, "_SEEN", {})
    return tmp_path


@pytest.mark.parametrize(
    ("child", "warning"),
    [
        ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", "AMX matmul crashed"),
        # what a build without the tile-configuration patch would print if the stale tiles did not fault
        ('print(\'{"amx": true, "stable": false}\')', "changed its answer after a PyTorch matmul"),
    ],
    ids=["crash", "unstable"],
)
def test_a_failing_probe_turns_amx_off_and_is_cached(fresh_probe, monkeypatch, caplog, child, warning):
    monkeypatch.setattr(probe, "child_command", lambda path: [sys.executable, "-c", child])
    with caplog.at_level(logging.WARNING, logger="domaintune.llamacpp"):
        assert probe.probe_amx(fresh_probe / "any.gguf") is False
    assert warning in caplog.text
    cached = json.loads(probe.cache_file().read_text(encoding="utf-8"))
    assert cached == {probe.library_key(): False}
    # the next process reads the verdict instead of probing again
    monkeypatch.setattr(probe, "_SEEN", {})
    monkeypatch.setattr(probe, "child_command", lambda path: pytest.fail("probed again"))
    assert probe.probe_amx(fresh_probe / "other.gguf") is False


def test_a_child_that_fails_otherwise_says_nothing_about_the_build(fresh_probe, monkeypatch):
    monkeypatch.setattr(probe, "child_command", lambda path: [sys.executable, "-c", "raise SystemExit(3)"])
    assert probe.probe_amx(fresh_probe / "broken.gguf") is False
    assert not probe.cache_file().exists()


def test_setup_builds_a_llama_cpp_whose_amx_batches_run(tiny_model_dir, gguf_dir):
    from domaintune.llamacpp.cache import gguf_for
    from domaintune.llamacpp.runtime import cpu_has_amx

    if not cpu_has_amx():
        pytest.skip("this CPU has no AMX")
    path = gguf_for(Path(tiny_model_dir), "q8_0", root=gguf_dir)
    # hidden 64 and FFN 128 are multiples of AMX's 32-wide tiles: the q8_0 matmuls take the AMX path; the
    # child decodes, lets PyTorch's oneDNN use (and release) the tiles on the same thread, and decodes again:
    # session 11's build died there with SIGILL, this one gives the same logits
    assert probe._run_child(path) == "amx"
