"""What the export reports for each artefact: size on disk, load time, generation speed, perplexity.

The perplexity is the export stage's own before/after metric: mean negative log-likelihood of
the reference assistant answer (the last assistant turn of each val row, under the chat
template), exponentiated. It is computed identically for every export so deltas are comparable.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from domaintune.errors import UserError


def folder_size(path: str | Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def eval_examples(tokenizer, rows: list[dict], max_length: int) -> list[tuple[list[int], int]]:
    """(input ids, index where the answer starts) for each row whose last message is the assistant's."""
    examples = []
    for row in rows:
        messages = row.get("messages") or []
        if len(messages) < 2 or messages[-1].get("role") != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if not full.startswith(prompt):
            raise UserError("the chat template renders the prompt differently inside the full conversation")
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(full, add_special_tokens=False)["input_ids"][:max_length]
        if len(full_ids) > len(prompt_ids):
            examples.append((full_ids, len(prompt_ids)))
    return examples


def perplexity(model, examples: list[tuple[list[int], int]]) -> dict[str, float]:
    """Answer-token perplexity of `model` over prepared examples (one forward pass per example)."""
    import torch

    total_nll, total_tokens = 0.0, 0
    device = next(model.parameters()).device if any(True for _ in model.parameters()) else torch.device("cpu")
    with torch.inference_mode():
        for ids, start in examples:
            input_ids = torch.tensor([ids], device=device)
            logits = model(input_ids=input_ids).logits[0, :-1].float()
            targets = input_ids[0, 1:]
            nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")[start - 1 :]
            total_nll += float(nll.sum())
            total_tokens += int(nll.numel())
    if total_tokens == 0:
        raise UserError("no answer tokens to score for the export's perplexity")
    mean = total_nll / total_tokens
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": total_tokens, "rows": len(examples)}


def generation_speed(model, tokenizer, prompts: list[list[dict]], new_tokens: int) -> dict[str, float]:
    """Greedy tokens/second with a fixed number of new tokens per prompt (so every model does equal work)."""
    import torch

    encoded = [
        tokenizer.apply_chat_template(p, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        for p in prompts
    ]
    with torch.inference_mode():
        model.generate(**encoded[0], max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        start = time.perf_counter()
        produced = 0
        for batch in encoded:
            out = model.generate(
                **batch,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            produced += out.shape[1] - batch["input_ids"].shape[1]
        seconds = time.perf_counter() - start
    return {"tokens_per_s": produced / seconds, "tokens": produced, "seconds": seconds}


def greedy_tokens(model, tokenizer, messages: list[dict], new_tokens: int) -> list[int]:
    import torch

    batch = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, batch["input_ids"].shape[1] :].tolist()


def compare_logits(reference, candidate, sequences: list[list[int]]) -> dict[str, float]:
    """Teacher-forced comparison: max abs difference, relative rms error and argmax agreement."""
    import torch

    max_abs, err_sq, ref_sq, agree, positions = 0.0, 0.0, 0.0, 0, 0
    with torch.inference_mode():
        for ids in sequences:
            input_ids = torch.tensor([ids])
            ref = reference(input_ids=input_ids).logits[0].float()
            got = candidate(input_ids=input_ids).logits[0].float()
            diff = got - ref
            centred = ref - ref.mean(dim=-1, keepdim=True)
            max_abs = max(max_abs, float(diff.abs().max()))
            err_sq += float(diff.pow(2).sum())
            ref_sq += float(centred.pow(2).sum())
            agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
            positions += ref.shape[0]
    return {
        "max_abs_diff": max_abs,
        "relative_error": math.sqrt(err_sq / ref_sq) if ref_sq else 0.0,
        "argmax_agreement": agree / positions if positions else 1.0,
        "positions": positions,
    }


def answer_quality(model, tokenizer, rows: list[dict], primary_metric: str, max_new_tokens: int) -> dict[str, Any]:
    """Greedy answers to test prompts scored with the eval stage's metric (`eval.primary_metric`).

    The same prompts, decoding and scorer for every artefact, so the difference between two
    artefacts is the quantisation's effect on answer quality. Generation stops at end of turn.
    """
    import torch

    from domaintune.eval.metrics import score_item
    from domaintune.model.loader import end_of_turn_token_ids

    family = next(
        (f for f in ("rouge", "bleu", "chrf", "exact_match", "token_f1") if primary_metric.startswith(f)), None
    )
    if family is None:
        raise UserError(f"eval.primary_metric {primary_metric!r} is not a text metric the export can score")
    stop = end_of_turn_token_ids(tokenizer)
    scores, answers = [], []
    with torch.inference_mode():
        for row in rows:
            messages = row["messages"]
            batch = tokenizer.apply_chat_template(
                messages[:-1], add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stop,
                pad_token_id=tokenizer.pad_token_id,
            )
            text = tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True).strip()
            value = score_item(text, messages[-1]["content"], [family]).get(primary_metric)
            if value is None:
                raise UserError(f"eval.primary_metric {primary_metric!r} is not produced by the {family} scorer")
            scores.append(value)
            answers.append(text)
    return {
        "metric": primary_metric,
        "mean": sum(scores) / len(scores),
        "items": len(scores),
        "max_new_tokens": max_new_tokens,
        "scores": scores,
        "first_answer": answers[0] if answers else None,
    }
