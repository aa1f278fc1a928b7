"""The models under comparison: local folders (base, tuned, merged, any HF folder) and OpenAI-compatible endpoints.

Every model answers the same prompts with the same decoding settings. Local models generate in
batches with left padding and stop at the chat template's end-of-turn tokens.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from domaintune.errors import UserError
from domaintune.eval.config import DecodingConfig, ModelSpec
from domaintune.model.tools import calls_text, render_prompt, split_tools_header
from domaintune.utils.io import fingerprint_files

if TYPE_CHECKING:
    from domaintune.config import ProjectConfig
    from domaintune.layout import RunLayout

log = logging.getLogger(__name__)

_FINGERPRINT_SUFFIXES = (".safetensors", ".bin", ".json", ".jinja", ".model", ".txt", ".py")


@lru_cache(maxsize=32)
def _folder_fingerprint_cached(path: str, stamp: tuple) -> str:
    files = [Path(path) / name for name, _, _ in stamp]
    return fingerprint_files(files) if files else "empty"


def folder_fingerprint(path: str | Path) -> str:
    """sha256 over the weights, config and tokenizer files of a model folder (not sub-folders)."""
    path = Path(path)
    entries = sorted(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns)
        for p in path.iterdir()
        if p.is_file() and p.suffix in _FINGERPRINT_SUFFIXES and not p.name.startswith(".")
    )
    return _folder_fingerprint_cached(str(path.resolve()), tuple(entries))


def decoding_key(decoding: DecodingConfig, seed: int) -> dict[str, Any]:
    """The settings that change an answer (batch size does not)."""
    key = {
        "max_new_tokens": decoding.max_new_tokens,
        "temperature": decoding.temperature,
        "repetition_penalty": decoding.repetition_penalty,
    }
    if decoding.temperature > 0:
        key.update(top_p=decoding.top_p, seed=seed)
    return key


def clean_answer(text: str) -> str:
    """Strip blanks and the U+FFFD left when max_new_tokens cuts a multi-byte character in half."""
    return text.strip().rstrip("\ufffd").rstrip()


@dataclass
class Answer:
    text: str
    n_tokens: int | None
    latency_s: float
    batch_size: int = 1
    token_ids: list[int] | None = None  # llama.cpp answers: for the agreement check with transformers
    nll: tuple[float, int] | None = None  # the reference's (summed NLL, tokens), scored on its prompt


@dataclass
class EvalModel:
    """One model in the comparison. `loader` returns (model, tokenizer) for local models."""

    name: str
    kind: str  # "local" | "endpoint"
    identity: str
    description: str
    loader: Callable[[], tuple[Any, Any]] | None = None
    spec: ModelSpec | None = None
    cacheable: bool = True
    _loaded: tuple[Any, Any] | None = field(default=None, repr=False)
    notes: list[str] = field(default_factory=list)
    engine: str = "transformers"  # "llamacpp": answers from a q8_0 GGUF of `hf_source`'s folder
    engine_reason: str = ""  # why eval.engine chose it (the report says)
    hf_source: Callable[[], tuple[Path, Any]] | None = None  # (plain HF folder, tokenizer with the eval template)
    engine_settings: dict[str, Any] = field(default_factory=dict)  # what the engine chose as it ran (the report says)
    scorer: str = "transformers"  # "llamacpp": reference perplexity from the q8_0 GGUF, on the answers' prompts

    # ------------------------------------------------------------------ lifecycle
    def _ensure_loaded(self) -> tuple[Any, Any]:
        if self._loaded is None:
            if self.loader is None:
                raise RuntimeError(f"{self.name}: an endpoint model has no local weights to load")
            model, tokenizer = self.loader()
            model.eval()  # generation and scoring run under torch.inference_mode(); no global grad switch
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            self._loaded = (model, tokenizer)
        return self._loaded

    def unload(self) -> None:
        self._loaded = None
        gc.collect()

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        prompts: Sequence[list[dict]],
        decoding: DecodingConfig,
        seed: int,
        desc: str = "",
        on_batch: Callable[[list[int], list[Answer]], None] | None = None,
        references: Sequence[str] | None = None,
        perplexity_max_tokens: int = 2048,
    ) -> list[Answer]:
        """Answers in prompt order; `on_batch(indices, answers)` is called as each batch finishes.

        `references` (llama.cpp only): each answer's `nll` is its reference scored on the same prompt."""
        if not prompts:
            return []
        if references is not None and self.engine != "llamacpp":
            raise ValueError(f"{self.name}: references are scored during generation by llama.cpp only")
        if self.kind == "endpoint":
            return self._generate_endpoint(prompts, decoding, seed, desc, on_batch)
        if self.engine == "llamacpp":
            return self._generate_llamacpp(prompts, decoding, seed, desc, on_batch, references, perplexity_max_tokens)
        return self._generate_local(prompts, decoding, seed, desc, on_batch)

    def _generate_llamacpp(
        self,
        prompts,
        decoding: DecodingConfig,
        seed: int,
        desc: str,
        on_batch=None,
        references: Sequence[str] | None = None,
        perplexity_max_tokens: int = 2048,
    ):
        """Batched continuous decoding in llama.cpp (`decoding.batch_size` sequences together); with
        `references`, each one scored teacher-forced on its answer's prompt (`llamacpp.generate`)."""
        from domaintune.llamacpp.cache import gguf_for
        from domaintune.llamacpp.generate import Decoder, Sampling, generate
        from domaintune.llamacpp.runtime import GGUFModel
        from domaintune.llamacpp.tuning import choose_flash_attention
        from domaintune.model.loader import end_of_turn_token_ids

        if self.hf_source is None:
            raise RuntimeError(f"{self.name}: no model folder for llama.cpp")
        folder, tokenizer = self.hf_source()
        eot = end_of_turn_token_ids(tokenizer)
        ids = llamacpp_prompt_ids(tokenizer, prompts, decoding.max_prompt_tokens)
        scored = (
            None
            if references is None
            else llamacpp_answer_ids(tokenizer, prompts, references, ids, perplexity_max_tokens)
        )
        sample = decoding.temperature > 0
        params = [
            Sampling(
                max_tokens=decoding.max_new_tokens,
                temperature=decoding.temperature,
                top_p=decoding.top_p if sample else 1.0,
                repetition_penalty=decoding.repetition_penalty,
                seed=seed + i if sample else None,
            )
            for i in range(len(ids))
        ]
        model = GGUFModel(gguf_for(folder, "q8_0"))
        ctx = max(len(i) for i in ids) + decoding.max_new_tokens + 8
        if scored is not None:
            ctx = max(ctx, max(len(p) + len(a) for p, a in zip(ids, scored)) + 8)
        # Chosen for the configured batch, not for this call's count, so that small sets (robustness, a
        # resumed run's last prompts) reuse the verdict of the full batch instead of measuring their own.
        flash = choose_flash_attention(
            model, decoding.batch_size, sum(map(len, ids)) // len(ids), decoding.max_new_tokens
        )
        self.engine_settings["flash_attention"] = {"on": flash.on, "reason": flash.reason}
        n_seq = min(decoding.batch_size, len(ids))
        decoder = Decoder(model, stop_ids=eot, n_seq=n_seq, seq_ctx=ctx, flash_attention=flash.on)
        answers: list[Answer | None] = [None] * len(ids)
        bar = tqdm(total=len(ids), desc=desc or self.name, unit="answer", dynamic_ncols=True)
        t0 = time.perf_counter()

        def done(i: int, seq) -> None:
            n = len(seq.tokens) + (1 if seq.finish_reason == "stop" else 0)
            text = clean_answer(tokenizer.decode(seq.tokens, skip_special_tokens=True))
            nll = None if seq.reference is None else (seq.nll, len(seq.reference))
            answers[i] = Answer(text, n, time.perf_counter() - t0, decoder.ctx.n_seq, list(seq.tokens), nll)
            bar.update(1)
            if on_batch:
                on_batch([i], [answers[i]])

        try:
            generate(decoder, ids, params, on_done=done, references=scored)
            if decoder.refed_prompts:
                self.engine_settings["prompts_fed_twice"] = decoder.refed_prompts
        finally:
            bar.close()
            decoder.close()
            model.close()
        return answers

    def _generate_local(self, prompts, decoding: DecodingConfig, seed: int, desc: str, on_batch=None) -> list[Answer]:
        import torch
        from transformers import GenerationConfig

        from domaintune.model.loader import end_of_turn_token_ids

        model, tokenizer = self._ensure_loaded()
        eot = end_of_turn_token_ids(tokenizer)
        tokenizer.padding_side = "left"
        tokenizer.truncation_side = "left"
        texts = [render_prompt(tokenizer, p) for p in prompts]  # a prompt's tools header: the template's tools
        lengths = [len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
        # Longest first: similar lengths share a batch (less padding), and the ETA is pessimistic early.
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])
        sample = decoding.temperature > 0
        gen_kwargs: dict[str, Any] = {
            "max_new_tokens": decoding.max_new_tokens,
            "do_sample": sample,
            "eos_token_id": eot,
            "pad_token_id": tokenizer.pad_token_id,
            "repetition_penalty": decoding.repetition_penalty,
        }
        if sample:
            gen_kwargs.update(temperature=decoding.temperature, top_p=decoding.top_p, top_k=0)
        gen_config = GenerationConfig(**gen_kwargs)
        answers: list[Answer | None] = [None] * len(texts)
        bar = tqdm(total=len(texts), desc=desc or self.name, unit="answer", dynamic_ncols=True)
        try:
            for b, start in enumerate(range(0, len(order), decoding.batch_size)):
                idx = order[start : start + decoding.batch_size]
                enc = tokenizer(
                    [texts[i] for i in idx],
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=False,
                    truncation=True,
                    max_length=decoding.max_prompt_tokens,
                )
                if sample:
                    torch.manual_seed(seed + b)
                t0 = time.perf_counter()
                with torch.inference_mode():
                    out = model.generate(**enc, generation_config=gen_config)
                elapsed = time.perf_counter() - t0
                new = out[:, enc["input_ids"].shape[1] :].tolist()
                for row, i in zip(new, idx):
                    stop = next((k for k, tok in enumerate(row) if tok in eot), None)
                    kept = row if stop is None else row[:stop]
                    n_tokens = len(row) if stop is None else stop + 1
                    text = clean_answer(tokenizer.decode(kept, skip_special_tokens=True))
                    answers[i] = Answer(text=text, n_tokens=n_tokens, latency_s=elapsed, batch_size=len(idx))
                bar.update(len(idx))
                if on_batch:
                    on_batch(list(idx), [answers[i] for i in idx])
        finally:
            bar.close()
        return answers  # type: ignore[return-value]

    def _endpoint_spec(self) -> ModelSpec:
        if self.spec is None:
            raise RuntimeError(f"{self.name}: a local model has no endpoint")
        return self.spec

    def _client(self):
        from openai import OpenAI

        spec = self._endpoint_spec()
        key = spec.api_key or (os.environ.get(spec.api_key_env) if spec.api_key_env else None)
        if spec.api_key_env and not key and not spec.api_key:
            raise UserError(f"eval.models[{spec.name}]: environment variable {spec.api_key_env} is not set")
        return OpenAI(base_url=spec.url, api_key=key or "no-key", timeout=spec.timeout_s, max_retries=2)

    def _generate_endpoint(
        self, prompts, decoding: DecodingConfig, seed: int, desc: str, on_batch=None
    ) -> list[Answer]:
        import openai

        spec = self._endpoint_spec()
        client = self._client()
        model_id = spec.model or spec.name
        if decoding.repetition_penalty != 1.0 and "repetition_penalty" not in " ".join(self.notes):
            self.notes.append("repetition_penalty is not part of the OpenAI API; the endpoint decodes without it")
        answers = []
        bar = tqdm(total=len(prompts), desc=desc or self.name, unit="answer", dynamic_ncols=True)
        try:
            for prompt in prompts:
                tools, messages = split_tools_header(prompt)
                kwargs: dict[str, Any] = {
                    "model": model_id,
                    "messages": messages,
                    "max_tokens": decoding.max_new_tokens,
                    "temperature": decoding.temperature,
                    "seed": seed,
                }
                if decoding.temperature > 0:
                    kwargs["top_p"] = decoding.top_p
                if tools:
                    kwargs["tools"] = tools
                t0 = time.perf_counter()
                try:
                    resp = client.chat.completions.create(**kwargs)
                except openai.APIError as exc:
                    raise UserError(f"eval.models[{self.name}]: endpoint {spec.url} failed: {exc}") from None
                elapsed = time.perf_counter() - t0
                text = (resp.choices[0].message.content or "").strip() if resp.choices else ""
                if resp.choices and resp.choices[0].message.tool_calls:  # scored as a local model's calls are
                    calls = [c.model_dump() for c in resp.choices[0].message.tool_calls]
                    text = "\n".join(t for t in (text, calls_text(calls)) if t)
                n_tokens = resp.usage.completion_tokens if resp.usage else None
                answers.append(Answer(text=text, n_tokens=n_tokens, latency_s=elapsed, batch_size=1))
                bar.update(1)
                if on_batch:
                    on_batch([len(answers) - 1], [answers[-1]])
        finally:
            bar.close()
        return answers

    # ------------------------------------------------------------------ perplexity
    def reference_nll(
        self,
        prompts: Sequence[list[dict]],
        references: Sequence[str],
        max_length: int,
        batch_size: int,
        desc: str,
        precision: str = "fp32",
        max_prompt_tokens: int = 1536,
    ) -> list[tuple[float, int]]:
        """(sum of negative log-likelihood, number of tokens) of each reference's assistant tokens
        (answer text plus the end-of-turn token) given its prompt.

        `scorer` llamacpp: by the q8_0 GGUF that answers (references whose answers were cached before their
        scores; the others are scored while answering, `generate(references=...)`). Otherwise by transformers;
        `precision` bf16: the layers run under bf16 autocast, the output projection and the softmax in fp32
        (see `scoring_precision`)."""
        if self.scorer == "llamacpp":
            return self._reference_nll_llamacpp(prompts, references, max_length, max_prompt_tokens, desc)
        import inspect

        import torch
        import torch.nn.functional as F

        model, tokenizer = self._ensure_loaded()
        rows = reference_token_rows(tokenizer, prompts, references, max_length)

        pad = tokenizer.pad_token_id
        # Left padding: every answer ends at the right edge, so only the last (longest answer + 1) positions
        # need logits (`logits_to_keep`), sparing most of the vocabulary projection and softmax.
        keep_ok = "logits_to_keep" in inspect.signature(model.forward).parameters
        results: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: -(len(rows[i][0]) + len(rows[i][1])))
        bar = tqdm(total=len(rows), desc=desc, unit="ref", dynamic_ncols=True)
        try:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                width = max(len(rows[i][0]) + len(rows[i][1]) for i in idx)
                keep = max(len(rows[i][1]) for i in idx) + 1
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                labels = torch.full((len(idx), width), -100, dtype=torch.long)
                for r, i in enumerate(idx):
                    p_ids, a_ids = rows[i]
                    seq = p_ids + a_ids
                    ids[r, width - len(seq) :] = torch.tensor(seq)
                    mask[r, width - len(seq) :] = 1
                    labels[r, width - len(a_ids) :] = torch.tensor(a_ids)
                position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
                kwargs = {"logits_to_keep": keep} if keep_ok and keep < width else {}
                with torch.inference_mode(), scoring_precision(model, precision):
                    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, **kwargs).logits
                logits = logits[:, -width:]  # prompt/p-tuning adapters put their virtual tokens' positions first
                kept = logits.shape[1]
                # logits at position t predict token t + 1
                shift_logits = logits[:, :-1].float()
                shift_labels = labels[:, width - kept + 1 :]
                nll = F.cross_entropy(
                    shift_logits.reshape(-1, shift_logits.size(-1)),
                    shift_labels.reshape(-1),
                    ignore_index=-100,
                    reduction="none",
                ).view(len(idx), -1)
                for r, i in enumerate(idx):
                    valid = shift_labels[r] != -100
                    results[i] = (float(nll[r][valid].sum()), int(valid.sum()))
                bar.update(len(idx))
        finally:
            bar.close()
        return results

    def _reference_nll_llamacpp(
        self,
        prompts: Sequence[list[dict]],
        references: Sequence[str],
        max_length: int,
        max_prompt_tokens: int,
        desc: str,
    ) -> list[tuple[float, int]]:
        """A scoring pass alone, on the prompt ids the answers were generated from (the same NLL as scoring
        while answering)."""
        from domaintune.llamacpp.cache import gguf_for
        from domaintune.llamacpp.generate import score_rows
        from domaintune.llamacpp.runtime import Context, GGUFModel

        if self.hf_source is None:
            raise RuntimeError(f"{self.name}: no model folder for llama.cpp")
        folder, tokenizer = self.hf_source()
        ids = llamacpp_prompt_ids(tokenizer, prompts, max_prompt_tokens)
        rows = list(zip(ids, llamacpp_answer_ids(tokenizer, prompts, references, ids, max_length)))
        longest = max(len(p) + len(a) for p, a in rows)
        model = GGUFModel(gguf_for(folder, "q8_0"))
        ctx = Context(model, n_seq=8, seq_ctx=longest + 8, n_batch=max(2048, longest + 8))
        results: list[tuple[float, int]] = []
        bar = tqdm(total=len(rows), desc=desc, unit="ref", dynamic_ncols=True)
        try:
            for start in range(0, len(rows), 32):
                part = score_rows(ctx, rows[start : start + 32])
                results.extend((nll, n) for nll, n, _ in part)
                bar.update(len(part))
        finally:
            bar.close()
            ctx.close()
            model.close()
        return results


def llamacpp_prompt_ids(tokenizer: Any, prompts: Sequence[list[dict]], max_prompt_tokens: int) -> list[list[int]]:
    """The ids llama.cpp answers from (and scores references on): the template's text, its last tokens kept."""
    texts = [render_prompt(tokenizer, p) for p in prompts]  # a prompt's tools header: the template's tools
    return [tokenizer(t, add_special_tokens=False).input_ids[-max_prompt_tokens:] for t in texts]


def llamacpp_answer_ids(
    tokenizer: Any,
    prompts: Sequence[list[dict]],
    references: Sequence[str],
    prompt_ids: Sequence[list[int]],
    max_length: int,
) -> list[list[int]]:
    """Each reference's answer ids (text and end-of-turn token) as llama.cpp scores them: on the prompt ids
    the model answered from, the answer cut to what fits in `max_length` with them (at least one token)."""
    rows = reference_token_rows(tokenizer, prompts, references, max_length)
    return [a[: max(1, max_length - len(p))] for (_, a), p in zip(rows, prompt_ids, strict=True)]


@contextlib.contextmanager
def scoring_precision(model: Any, precision: str) -> Iterator[None]:
    """Run `model`'s forward passes in `precision` (fp32: as loaded; bf16: bf16 autocast) with the output
    projection always in fp32.

    Why the projection stays fp32: bf16 keeps 8 significant bits, so a logit near 20 is rounded to a multiple
    of 0.125 and each token's log-probability moves by up to ~0.06 nats; the layers below it tolerate bf16
    (their rounding averages out), the logits that the loss reads directly do not."""
    if precision == "fp32":
        yield
        return
    import torch

    if precision != "bf16":
        raise ValueError(f"scoring precision {precision!r}: use fp32 or bf16")
    device = next(model.parameters()).device.type
    head = model.get_output_embeddings()
    projection = head.forward

    def fp32_projection(hidden: Any) -> Any:
        with torch.autocast(device, enabled=False):
            return projection(hidden.float())

    head.forward = fp32_projection  # the instance attribute shadows the class's forward until deleted
    try:
        with torch.autocast(device, dtype=torch.bfloat16):
            yield
    finally:
        del head.forward


def reference_token_rows(
    tokenizer: Any, prompts: Sequence[list[dict]], references: Sequence[str], max_length: int
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) per reference: the answer text as the template renders it, up to and including
    the end-of-turn token, the prompt cut from the left so both fit in `max_length`."""
    from domaintune.model.loader import end_of_turn_token_ids

    eot_text = tokenizer.convert_ids_to_tokens(end_of_turn_token_ids(tokenizer)[0])
    rows: list[tuple[list[int], list[int]]] = []
    for prompt, reference in zip(prompts, references):
        prompt_text = render_prompt(tokenizer, prompt)
        full_text = render_prompt(tokenizer, [*prompt, {"role": "assistant", "content": reference}], False)
        if full_text.startswith(prompt_text):
            answer_text = full_text[len(prompt_text) :]
            cut = answer_text.find(eot_text)
            if cut >= 0:
                answer_text = answer_text[: cut + len(eot_text)]
        else:  # a template that rewrites earlier turns; score the answer and its end-of-turn token
            answer_text = reference + eot_text
        p_ids = tokenizer(prompt_text, add_special_tokens=False).input_ids
        a_ids = tokenizer(answer_text, add_special_tokens=False).input_ids[: max_length - 1]
        p_ids = p_ids[-(max_length - len(a_ids)) :]
        rows.append((p_ids, a_ids))
    return rows


def perplexity(rows: Sequence[tuple[float, int]]) -> float | None:
    tokens = sum(n for _, n in rows)
    return math.exp(sum(s for s, _ in rows) / tokens) if tokens else None


# ---------------------------------------------------------------------- building the list


def _adapter_identity(path: Path) -> str:
    from domaintune.model.config import ModelConfig
    from domaintune.model.loader import resolve_model_dir

    base = json.loads((path / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path", "")
    base_dir = Path(base) if Path(base).is_dir() else resolve_model_dir(ModelConfig(name_or_path=base))
    return f"adapter:{folder_fingerprint(path)}+base:{folder_fingerprint(base_dir)}"


def local_identity(path: Path) -> str:
    from domaintune.model.loader import is_adapter_dir

    return _adapter_identity(path) if is_adapter_dir(path) else f"folder:{folder_fingerprint(path)}"


def choose_eval_engine(setting: str) -> tuple[str, str]:
    """(engine, reason) for `eval.engine`; `llamacpp` that cannot run is an error naming the key."""
    if setting == "transformers":
        return "transformers", "eval.engine=transformers"
    from domaintune.llamacpp import converter_unavailable_reason, unavailable_reason

    reason = unavailable_reason() or converter_unavailable_reason()
    if setting == "llamacpp":
        if reason:
            raise UserError(f"eval.engine is 'llamacpp' but llama.cpp cannot run here ({reason}); set eval.engine")
        return "llamacpp", "eval.engine=llamacpp"
    import torch

    if torch.cuda.is_available():
        return "transformers", "eval.engine=auto: transformers on the CUDA GPU"
    if reason:
        return "transformers", f"eval.engine=auto: transformers because {reason}"
    return "llamacpp", "eval.engine=auto: llama.cpp on the CPU (q8_0 GGUF of each model)"


def _hf_source(
    folder: Path, base_dir: Path | None, chat_template: str | None, thinking: str | None = None
) -> tuple[Path, Any]:
    """The plain HF folder llama.cpp converts (an adapter merged into `base_dir` first) and its tokenizer."""
    from transformers import AutoTokenizer

    from domaintune.llamacpp.cache import merged_adapter
    from domaintune.model.loader import apply_chat_template_setting, is_adapter_dir

    source = merged_adapter(folder, base_dir) if base_dir is not None and is_adapter_dir(folder) else folder
    tokenizer = AutoTokenizer.from_pretrained(folder if (folder / "tokenizer_config.json").is_file() else source)
    apply_chat_template_setting(tokenizer, chat_template, source=str(folder), thinking=thinking)
    return source, tokenizer


# Chinese, English, digits, punctuation and an emoji: text a GGUF vocabulary converted by a guess gets wrong.
TOKENIZER_PROBE = "高血压患者每天应该监测血压吗？Blood pressure 140/90 mmHg — check twice daily. 🙂"


def _check_gguf_tokenizer(cfg: ProjectConfig, setting: str, why: str) -> tuple[str, str]:
    """llama.cpp only where its GGUF tokenizes like the model: a converter that had to guess the vocabulary
    (a SentencePiece model whose folder lacks tokenizer.model, `domaintune.model.spm_vocab`) would feed and decode
    other tokens than the model learned."""
    from domaintune.llamacpp.cache import gguf_for
    from domaintune.llamacpp.runtime import GGUFModel
    from domaintune.model.loader import resolve_model_dir

    folder, tokenizer = _hf_source(resolve_model_dir(cfg.model), None, cfg.model.chat_template)
    gguf = GGUFModel(gguf_for(folder, "q8_0"), vocab_only=True)
    try:
        ours = gguf.tokenize(TOKENIZER_PROBE, add_special=False, parse_special=False)
        text = gguf.detokenize(ours)
    finally:
        gguf.close()
    theirs = tokenizer(TOKENIZER_PROBE, add_special_tokens=False).input_ids
    if ours == theirs and text == TOKENIZER_PROBE:
        return "llamacpp", why
    problem = f"the GGUF of {cfg.model.name_or_path} tokenizes differently from its tokenizer ({len(ours)} vs {len(theirs)} tokens for a probe text)"
    if setting == "llamacpp":
        raise UserError(f"eval.engine is 'llamacpp' but {problem}; set eval.engine: transformers")
    return "transformers", f"eval.engine=auto: transformers because {problem}"


def _use_engine(models: list[EvalModel], engine: str, cfg: ProjectConfig) -> None:
    """Every local model answers through the same engine (and its identity says which, for the answer cache)."""
    from domaintune.model.loader import resolve_model_dir

    if engine != "llamacpp":
        return
    base_dir = resolve_model_dir(cfg.model)
    for m in models:
        if m.kind != "local":
            continue
        m.engine = "llamacpp"
        m.identity += "|engine:llamacpp-q8_0"
        if m.name == "base":
            m.hf_source = functools.partial(
                _hf_source, base_dir, None, cfg.model.chat_template, thinking=cfg.model.thinking
            )
        else:
            folder = Path(m.spec.path) if m.spec is not None and m.spec.path is not None else Path(m.description)
            m.hf_source = functools.partial(_hf_source, folder, base_dir, None)


def build_models(cfg: ProjectConfig, layout: RunLayout) -> list[EvalModel]:
    """base (the `model:` section), tuned (the run's `model/`) and every `eval.models` entry."""
    from domaintune.model.loader import load_model_and_tokenizer, load_trained, resolve_model_dir

    ecfg = cfg.eval
    dtype = cfg.model.dtype if cfg.model.dtype != "auto" else "float32"
    models: list[EvalModel] = []
    if ecfg.base:
        base_dir = resolve_model_dir(cfg.model)
        template = (cfg.model.chat_template or "") + (f"|thinking:{cfg.model.thinking}" if cfg.model.thinking else "")
        models.append(
            EvalModel(
                name="base",
                kind="local",
                identity=f"folder:{folder_fingerprint(base_dir)}|template:{template}",
                description=f"{cfg.model.name_or_path} ({base_dir})",
                loader=lambda: load_model_and_tokenizer(cfg.model, dtype=dtype),
            )
        )
    if ecfg.tuned:
        tuned_dir = layout.model_dir
        if not tuned_dir.is_dir():
            raise UserError(
                f"tuned model folder {tuned_dir} does not exist: run `domaintune train` first, "
                "or set eval.tuned: false to evaluate other models only"
            )
        models.append(
            EvalModel(
                name="tuned",
                kind="local",
                identity=local_identity(tuned_dir),
                description=str(tuned_dir),
                # An adapter is merged for evaluation: the same function, faster to run.
                loader=lambda: load_trained(tuned_dir, dtype=dtype, merge=True),
            )
        )
    for spec in ecfg.models:
        if spec.path is not None:
            path = Path(spec.path)
            if not path.is_dir():
                raise UserError(f"eval.models[{spec.name}].path: {path} is not a folder")
            models.append(
                EvalModel(
                    name=spec.name,
                    kind="local",
                    identity=local_identity(path),
                    description=str(path),
                    loader=functools.partial(load_trained, path, dtype=dtype, merge=True),
                    spec=spec,
                )
            )
        else:
            models.append(
                EvalModel(
                    name=spec.name,
                    kind="endpoint",
                    identity=f"endpoint:{spec.url}|{spec.model or spec.name}",
                    description=f"{spec.model or spec.name} at {spec.url}",
                    spec=spec,
                    cacheable=spec.cache,
                )
            )
    if not models:
        raise UserError("eval: nothing to evaluate (eval.base and eval.tuned are false and eval.models is empty)")
    engine, why = choose_eval_engine(ecfg.engine)
    if engine == "llamacpp":
        engine, why = _check_gguf_tokenizer(cfg, ecfg.engine, why)
    log.info("%s", why)
    _use_engine(models, engine, cfg)
    scorer = choose_scorer(ecfg.perplexity_engine, engine)
    for m in models:
        m.engine_reason = why if m.kind == "local" else ""
        m.scorer = scorer if m.kind == "local" else "none"
    return models


def choose_scorer(setting: str, engine: str) -> str:
    """Who scores reference perplexity: `eval.perplexity_engine` auto is the answering engine (llama.cpp scores
    each reference on its answer's prompt, the prompt processed once for both); `llamacpp` needs it to answer."""
    if setting == "llamacpp" and engine != "llamacpp":
        raise UserError(
            "eval.perplexity_engine is 'llamacpp' but the answers come from transformers (eval.engine); "
            "set eval.perplexity_engine: auto or transformers"
        )
    return "llamacpp" if setting != "transformers" and engine == "llamacpp" else "transformers"
