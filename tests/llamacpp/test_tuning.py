"""Flash attention chosen by measuring both settings on this CPU, once per workload shape, cached on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from domaintune.llamacpp import tuning

pytestmark = pytest.mark.usefixtures("llamacpp_ready")


@pytest.fixture()
def tiny_gguf(tiny_model_dir, gguf_dir, tmp_path, monkeypatch):
    from domaintune.llamacpp.cache import gguf_for
    from domaintune.llamacpp.runtime import GGUFModel

    monkeypatch.setenv("DOMAINTUNE_CACHE", str(tmp_path / "models"))
    monkeypatch.delenv(tuning.ENV, raising=False)
    model = GGUFModel(gguf_for(Path(tiny_model_dir), "q8_0", root=gguf_dir))
    yield model
    model.close()


def test_both_settings_are_measured_once_and_the_faster_is_kept(tiny_gguf, monkeypatch):
    measured = []
    real = tuning.measure_flash_attention

    def counting(*args, **kwargs):
        measured.append(args[1:4])
        return real(*args, **kwargs)

    monkeypatch.setattr(tuning, "measure_flash_attention", counting)
    first = tuning.choose_flash_attention(tiny_gguf, n_seq=4, prompt_tokens=40, new_tokens=16)
    assert first.seconds_off > 0 and first.seconds_on > 0
    assert first.on == (first.seconds_on < first.seconds_off)
    assert "off prompts" in first.reason and "on prompts" in first.reason
    assert measured == [(4, 64, 16)]  # prompt lengths are bucketed (40 -> 64)
    # the verdict is on disk, keyed by CPU, build, model shape and workload
    (key,) = json.loads(tuning.cache_file().read_text(encoding="utf-8"))
    assert "seq=4|prompt=64|new=16" in key
    assert tuning.choose_flash_attention(tiny_gguf, n_seq=4, prompt_tokens=50, new_tokens=16) == first
    assert len(measured) == 1
    tuning.choose_flash_attention(tiny_gguf, n_seq=8, prompt_tokens=50, new_tokens=16)
    assert len(measured) == 2  # another workload shape is measured anew


def test_the_environment_decides_without_measuring(tiny_gguf, monkeypatch):
    monkeypatch.setattr(tuning, "measure_flash_attention", lambda *a, **k: pytest.fail("measured"))
    monkeypatch.setenv(tuning.ENV, "0")
    assert tuning.choose_flash_attention(tiny_gguf, 4, 40, 16).on is False
    monkeypatch.setenv(tuning.ENV, "1")
    choice = tuning.choose_flash_attention(tiny_gguf, 4, 40, 16)
    assert choice.on is True and choice.reason == f"{tuning.ENV}=1"
