"""GGUF files by llama.cpp itself: converted (f16), quantised, verified in llama.cpp, and the Ollama Modelfile.

- `check_gguf_plan` runs before anything is built: llama.cpp present, each type one it builds, the
  architecture known to llama.cpp's converter and the tokenizer convertible (`--vocab-only`). Its
  messages name the key to change (`export.gguf: []` to skip GGUF files).
- `build_ggufs` converts the merged model to f16 once, quantises it per `export.gguf` type and verifies
  each file where users run it (llama.cpp's greedy answers and perplexity against the merged model,
  the chat template rendered through llama.cpp, the end-of-turn stop). A file that fails is removed and
  reported in the manifest; the others are kept.
- The Modelfile's TEMPLATE and stop tokens come from the GGUF that it points at.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from domaintune.errors import UserError

if TYPE_CHECKING:
    from domaintune.config import ProjectConfig
    from domaintune.llamacpp.verify import HFReference

log = logging.getLogger(__name__)

SKIP_HINT = "set `export.gguf: []` to export without GGUF files"


def check_gguf_plan(cfg: ProjectConfig, model_dir: Path) -> None:
    """Fail before building anything when a configured GGUF cannot be built."""
    ecfg = cfg.export
    if not ecfg.gguf:
        return
    from domaintune.llamacpp import converter_unavailable_reason, unavailable_reason
    from domaintune.llamacpp.quantize import GGUF_TYPES

    reason = unavailable_reason() or converter_unavailable_reason()
    if reason:
        raise UserError(f"export.gguf {ecfg.gguf}: llama.cpp cannot run here ({reason}); {SKIP_HINT}")
    bad = [q for q in ecfg.gguf if q not in GGUF_TYPES]
    if bad:
        raise UserError(f"export.gguf: {bad} not built by llama.cpp here; types: {', '.join(GGUF_TYPES)}")
    if ecfg.modelfile and ecfg.modelfile_gguf not in ecfg.gguf:
        log.info(
            "export.modelfile_gguf %s is not in export.gguf: the Modelfile uses %s", ecfg.modelfile_gguf, ecfg.gguf[0]
        )
    from domaintune.llamacpp.tools import ConversionError, check_convertible

    source = _architecture_source(cfg, model_dir)
    try:
        check_convertible(source)
    except ConversionError as exc:
        raise UserError(f"export.gguf {ecfg.gguf}: {exc}\n{SKIP_HINT}") from exc
    if ecfg.modelfile and not ecfg.ollama_template:
        check_modelfile_template(cfg.model.chat_template, source)


def check_modelfile_template(chat_template: str | None, source: Path) -> None:
    """Fail before building anything when the Modelfile's TEMPLATE cannot be translated from the chat template."""
    from domaintune.export.modelfile import TEMPLATE_KEYS, ollama_family
    from domaintune.model.loader import NAMED_CHAT_TEMPLATES

    if chat_template:
        template, where = NAMED_CHAT_TEMPLATES.get(chat_template, chat_template), "model.chat_template"
    else:
        template, where = _stored_chat_template(source), f"{source}'s chat template"
    if ollama_family(template) is None:
        raise UserError(
            f"export.ollama_template: {where} is not ChatML, Llama-3 or Gemma, so the Ollama Modelfile's "
            f"TEMPLATE cannot be translated from it; {TEMPLATE_KEYS}"
        )


def _stored_chat_template(folder: Path) -> str:
    """The chat template a tokenizer folder stores (chat_template.jinja/.json, else tokenizer_config.json)."""
    import json

    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            stored = json.loads((folder / name).read_text(encoding="utf-8")).get("chat_template")
            if isinstance(stored, list):  # named templates: [{"name": ..., "template": ...}]
                stored = next((t["template"] for t in stored if t.get("name") == "default"), None)
            if stored:
                return str(stored)
    return ""


def _architecture_source(cfg: ProjectConfig, model_dir: Path) -> Path:
    """The folder with the config.json and tokenizer the merged model will have (an adapter's base)."""
    from domaintune.model.loader import is_adapter_dir, resolve_model_dir

    if not is_adapter_dir(model_dir):
        return model_dir
    base = resolve_model_dir(cfg.model)
    if (model_dir / "tokenizer_config.json").is_file():
        # the trained tokenizer (possibly with added tokens) on the base's config: what the merge writes
        import shutil
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="dt-convertible-"))
        shutil.copy2(base / "config.json", tmp / "config.json")
        for file in model_dir.iterdir():
            if file.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
                shutil.copy2(file, tmp / file.name)
        return tmp
    return base


def build_ggufs(
    cfg: ProjectConfig,
    merged_dir: Path,
    gguf_dir: Path,
    rows: list[dict],
    reference: Any,
    speed_prompts: list[list[int]],
) -> dict:
    """{"gguf-<type>": entry} for every configured type; a failure is an entry with `failed`, not an exception."""
    from domaintune.llamacpp.tools import convert_hf
    from domaintune.llamacpp.verify import HFReference

    ecfg = cfg.export
    gguf_dir.mkdir(parents=True, exist_ok=True)
    f16 = gguf_dir / f"{cfg.name}-f16.gguf"
    artifacts: dict[str, dict] = {}
    try:
        started = time.perf_counter()
        convert_hf(merged_dir, f16, "f16")
        convert_s = time.perf_counter() - started
    except Exception as exc:  # every type is built from this file: all of them fail, the other exports stay
        f16.unlink(missing_ok=True)
        return {f"gguf-{q}": _failed(q, f"llama.cpp's converter failed: {exc}") for q in ecfg.gguf}
    shared = HFReference(merged_dir, reference)  # the merged model's answers, computed once for every type
    for qtype in ecfg.gguf:
        try:
            artifacts[f"gguf-{qtype}"] = _build_one(
                cfg, qtype, f16, merged_dir, (rows, speed_prompts), shared, convert_s
            )
        except Exception as exc:
            log.warning("gguf-%s failed: %s", qtype, exc)
            if qtype != "f16":
                (gguf_dir / f"{cfg.name}-{qtype}.gguf").unlink(missing_ok=True)
            artifacts[f"gguf-{qtype}"] = _failed(qtype, str(exc))
            if isinstance(exc, GGUFVerificationError):  # the figures that failed it, for the manifest's reader
                artifacts[f"gguf-{qtype}"]["verified"] = exc.verification
    if "f16" not in ecfg.gguf or "failed" in artifacts.get("gguf-f16", {}):
        f16.unlink(missing_ok=True)
    if ecfg.modelfile:
        _modelfile(cfg, gguf_dir, artifacts)
    return artifacts


class GGUFVerificationError(UserError):
    """A GGUF that llama.cpp loads but that falls outside its type's tolerance; carries the verification."""

    def __init__(self, message: str, verification: dict[str, Any]):
        super().__init__(message)
        self.verification = verification


def _failed(qtype: str, reason: str) -> dict[str, Any]:
    return {"type": qtype, "failed": reason, "kept": False}


def _build_one(
    cfg: ProjectConfig,
    qtype: str,
    f16: Path,
    merged_dir: Path,
    inputs: tuple[list[dict], list[list[int]]],
    reference: HFReference,
    convert_s: float,
) -> dict[str, Any]:
    from domaintune.llamacpp.quantize import quantize

    ecfg = cfg.export
    path = f16 if qtype == "f16" else f16.with_name(f"{cfg.name}-{qtype}.gguf")
    started = time.perf_counter()
    if qtype != "f16":
        quantize(f16, path, qtype)
    entry: dict[str, Any] = {
        "path": f"gguf/{path.name}",
        "bytes": path.stat().st_size,
        "type": qtype,
        "built_by": "llama.cpp convert_hf_to_gguf.py" + ("" if qtype == "f16" else " + llama_model_quantize"),
        "build_s": round(convert_s + time.perf_counter() - started, 2),
    }
    if ecfg.verify_gguf:
        rows, speed_prompts = inputs
        verification = _verify(cfg, qtype, path, merged_dir, rows, reference)
        entry["verified"] = verification
        if not verification["ok"]:
            raise GGUFVerificationError(
                f"{path.name} does not pass verification in llama.cpp: {'; '.join(verification['problems'])} "
                f"(export.gguf_tolerance.{qtype} sets the perplexity bound; export.verify_gguf: false skips the check)",
                verification,
            )
        entry["speed"] = _speed(path, speed_prompts, ecfg.speed_new_tokens)
    return entry


def _verify(
    cfg: ProjectConfig, qtype: str, path: Path, merged_dir: Path, rows: list[dict], reference: HFReference
) -> dict:
    from domaintune.llamacpp.verify import NO_TOLERANCE, TOLERANCE, verify_gguf

    ecfg = cfg.export
    usable = [r for r in rows if len(r.get("messages") or []) >= 2 and r["messages"][-1]["role"] == "assistant"]
    conversations = [r["messages"][:-1] for r in usable] or [
        [{"role": "user", "content": "头痛发热三天，应该怎么办？"}]
    ]
    references = [r["messages"][-1]["content"] for r in usable] or None
    default = TOLERANCE.get(qtype, NO_TOLERANCE)
    tolerance = default._replace(max_perplexity_change=ecfg.gguf_tolerance.get(qtype, default.max_perplexity_change))
    _say(f"[gguf-{qtype}] verifying in llama.cpp on {len(conversations)} val rows")
    result = verify_gguf(
        path,
        merged_dir,
        qtype,
        conversations,
        references,
        max_new_tokens=ecfg.speed_new_tokens,
        tolerance=tolerance,
        reference=reference,
    )
    return result.as_dict()


def _speed(path: Path, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
    """Greedy tokens/s of the GGUF in llama.cpp, one prompt at a time (the export's speed prompts, no stop)."""
    from domaintune.llamacpp.generate import Decoder, Sampling, generate
    from domaintune.llamacpp.runtime import GGUFModel, default_threads

    model = GGUFModel(path)
    decoder = Decoder(model, stop_ids=[], n_seq=1, seq_ctx=max(len(p) for p in prompts) + new_tokens + 8)
    try:
        started = time.perf_counter()
        out = generate(decoder, prompts, Sampling(max_tokens=new_tokens))
        seconds = time.perf_counter() - started
    finally:
        decoder.close()
        model.close()
    tokens = sum(len(s.tokens) for s in out)
    return {
        "engine": "llamacpp",
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 2) if seconds else None,
        "threads": default_threads(),
    }


def _modelfile(cfg: ProjectConfig, gguf_dir: Path, artifacts: dict[str, dict]) -> None:
    """The Ollama Modelfile, from the chat template and end-of-turn tokens stored in the GGUF it points at."""
    from domaintune.export.modelfile import ollama_modelfile
    from domaintune.llamacpp.runtime import GGUFModel

    ecfg = cfg.export
    kept = [q for q in ecfg.gguf if "failed" not in artifacts.get(f"gguf-{q}", {"failed": True})]
    if not kept:
        return
    target = ecfg.modelfile_gguf if ecfg.modelfile_gguf in kept else kept[0]
    name = f"{cfg.name}-{target}.gguf"
    from domaintune.llamacpp.template import render_jinja

    model = GGUFModel(gguf_dir / name, vocab_only=True)
    try:
        template = model.chat_template() or ""
        stops = [model.token_text(t) for t in model.eog_ids()]
        text = ollama_modelfile(
            name,
            template,
            stops,
            ecfg.ollama_template,
            ecfg.ollama_parameters,
            system=cfg.data.system_prompt,
            render=lambda messages: render_jinja(model, messages, False),
        )
    finally:
        model.close()
    (gguf_dir / "Modelfile").write_text(text, encoding="utf-8")
    artifacts[f"gguf-{target}"]["modelfile"] = {"path": "gguf/Modelfile", "stop": stops}


def _say(message: str) -> None:
    from rich.console import Console

    Console(stderr=True).log(message, highlight=False, markup=False)
