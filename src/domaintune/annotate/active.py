"""Active learning: which unlabelled rows to label next.

Uncertainty of the current model, three ways:
- `margin`: for an intent (single-label) field, a character-bigram naive Bayes classifier trained on the labels
  settled so far; uncertainty = 1 - (p(top class) - p(second class)). Cheap, no GPU, and it is exactly the
  classifier whose weakness the next round should fix.
- `perplexity`: the trained model's (run's `model/`, else the base) perplexity of each row's answer.
- `sampling`: disagreement between k sampled answers of the model = 1 - mean pairwise character-bigram Jaccard.
Diversity: rows are clustered by MinHash-LSH on their prompt (data.minhash); the ranking takes the most uncertain
row of each cluster first, then the next of each cluster, so one topic cannot fill a round.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any

from domaintune.errors import UserError
from domaintune.utils.io import read_jsonl, write_jsonl

if TYPE_CHECKING:
    from domaintune.config import ProjectConfig


def bigrams(text: str) -> list[str]:
    t = "".join(str(text).split())
    return [t[k : k + 2] for k in range(len(t) - 1)] or ([t] if t else [])


class BigramNB:
    """Multinomial naive Bayes over character bigrams (Laplace smoothing)."""

    def __init__(self, alpha: float = 1.0):
        self.alpha = alpha
        self.classes: list[str] = []
        self.prior: dict[str, float] = {}
        self.counts: dict[str, Counter] = {}
        self.totals: dict[str, int] = {}
        self.vocab: set[str] = set()

    def fit(self, texts: Sequence[str], labels: Sequence[str]) -> BigramNB:
        by = Counter(labels)
        self.classes = sorted(by)
        self.prior = {c: math.log(by[c] / len(labels)) for c in self.classes}
        self.counts = {c: Counter() for c in self.classes}
        for text, label in zip(texts, labels):
            grams = bigrams(text)
            self.counts[label].update(grams)
            self.vocab.update(grams)
        self.totals = {c: sum(self.counts[c].values()) for c in self.classes}
        return self

    def proba(self, text: str) -> dict[str, float]:
        v = len(self.vocab) + 1
        scores = {}
        for c in self.classes:
            denom = math.log(self.totals[c] + self.alpha * v)
            scores[c] = self.prior[c] + sum(math.log(self.counts[c][g] + self.alpha) - denom for g in bigrams(text))
        top = max(scores.values())
        exp = {c: math.exp(s - top) for c, s in scores.items()}
        z = sum(exp.values())
        return {c: e / z for c, e in exp.items()}

    def predict(self, text: str) -> str:
        p = self.proba(text)
        return max(p, key=lambda c: p[c])


def margin_uncertainty(model: BigramNB, texts: Sequence[str]) -> list[float]:
    out = []
    for t in texts:
        p = sorted(model.proba(t).values(), reverse=True) + [0.0]
        out.append(1.0 - (p[0] - p[1]))
    return out


def sample_disagreement(samples: Sequence[Sequence[str]]) -> list[float]:
    """Per row, 1 - mean pairwise Jaccard of the character bigrams of its sampled answers."""
    out = []
    for answers in samples:
        sets = [set(bigrams(a)) for a in answers]
        sims = [len(a & b) / len(a | b) if a | b else 1.0 for a, b in combinations(sets, 2)]
        out.append(1.0 - (sum(sims) / len(sims) if sims else 1.0))
    return out


def clusters(texts: Sequence[str], threshold: float = 0.5, num_perm: int = 64) -> list[int]:
    """Cluster index per text: MinHash-LSH keep-first (a text joins the cluster of the first similar one)."""
    from domaintune.data.minhash import LSHIndex, MinHasher

    if not texts:
        return []
    hasher = MinHasher(num_perm=num_perm, char_ngram=3)
    index = LSHIndex(threshold=threshold, num_perm=num_perm)
    results = index.add_batch(hasher.signatures(list(texts)), list(range(len(texts))))
    head = [k if r.duplicate_of is None else int(r.duplicate_of) for k, r in enumerate(results)]
    return [head[h] if head[h] != h else h for h in head]


def diverse_rank(uncertainty: Sequence[float], cluster: Sequence[int]) -> list[int]:
    """Indices: the most uncertain row of every cluster (by uncertainty), then the second of every cluster, ..."""
    members: dict[int, list[int]] = defaultdict(list)
    for k in sorted(range(len(uncertainty)), key=lambda k: (-uncertainty[k], k)):
        members[cluster[k]].append(k)
    order: list[int] = []
    depth = 0
    while len(order) < len(uncertainty):
        layer = [m[depth] for m in members.values() if len(m) > depth]
        order.extend(sorted(layer, key=lambda k: (-uncertainty[k], k)))
        depth += 1
    return order


# ---- the model-based scorers ----------------------------------------------------------------------------
def answer_perplexity(
    model: Any, tokenizer: Any, rows: Sequence[tuple[str, str]], max_length: int = 512
) -> list[float]:
    """Perplexity of each answer given its prompt (chat template), one row at a time."""
    import torch

    out = []
    model.eval()
    for prompt, answer in rows:
        head = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids_p = tokenizer(head, add_special_tokens=False)["input_ids"]
        ids_a = tokenizer(answer, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
        ids = (ids_p + ids_a)[-max_length:]
        n_a = min(len(ids_a), len(ids) - 1)
        labels = [-100] * (len(ids) - n_a) + ids[len(ids) - n_a :]
        with torch.inference_mode():
            loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
        out.append(float(math.exp(min(float(loss), 50.0))))
    return out


def _current_model(cfg: ProjectConfig):
    from domaintune.model.loader import load_model_and_tokenizer, load_trained

    trained = cfg.layout.model_dir
    if trained.is_dir():
        return load_trained(trained)
    return load_model_and_tokenizer(cfg.model)


def _sampling_scores(cfg: ProjectConfig, prompts: list[str], k: int = 3) -> list[float]:
    from domaintune.data.augment.config import GeneratorConfig
    from domaintune.data.augment.generator import make_generator

    samples: list[list[str]] = [[] for _ in prompts]
    for seed in range(k):
        gen = make_generator(GeneratorConfig(temperature=0.8, seed=seed, max_new_tokens=64), cfg.model)
        outs = gen.generate([[{"role": "user", "content": p}] for p in prompts])
        for i, o in enumerate(outs):
            samples[i].append(o if isinstance(o, str) else "")
    return sample_disagreement(samples)


def settled_labels(projects: Sequence[Path], field: str) -> tuple[list[str], list[str]]:
    texts, labels = [], []
    for folder in projects:
        path = Path(folder) / "annotations.jsonl"
        if not path.is_file():
            raise UserError(f"{folder}: no annotations.jsonl (finalize the project first)")
        for row in read_jsonl(path):
            if row.get(field):
                texts.append(str(row.get("instruction", "")))
                labels.append(str(row[field]))
    return texts, labels


def score_rows(
    cfg: ProjectConfig, rows: list[dict[str, Any]], method: str, field: str | None, labelled: Sequence[Path]
) -> list[float]:
    prompts = [str(r["fields"].get("instruction", "")) for r in rows]
    if method == "margin":
        if field is None:
            raise UserError("method margin needs a `single` label in the task schema (the intent field)")
        texts, labels = settled_labels(labelled, field)
        if len(set(labels)) < 2:
            raise UserError("method margin needs finished projects (--labelled) with at least two classes")
        return margin_uncertainty(BigramNB().fit(texts, labels), prompts)
    if method == "perplexity":
        model, tok = _current_model(cfg)
        return answer_perplexity(model, tok, [(p, str(r["fields"].get("output", ""))) for p, r in zip(prompts, rows)])
    if method == "sampling":
        return _sampling_scores(cfg, prompts)
    raise UserError(f"unknown method {method!r}: margin, perplexity or sampling")


def rank_rows(rows: list[dict[str, Any]], scores: Sequence[float]) -> list[dict[str, Any]]:
    groups = clusters([str(r["fields"].get("instruction", "")) for r in rows])
    order = diverse_rank(scores, groups)
    return [
        {"rank": k + 1, "id": rows[i]["id"], "uncertainty": round(scores[i], 6), "cluster": groups[i]}
        for k, i in enumerate(order)
    ]


def select_round(
    cfg: ProjectConfig,
    task_path: Path,
    method: str,
    n: int,
    labelled: Sequence[Path],
    out_dir: Path | None,
    scorer: Callable | None = None,
) -> dict[str, Any]:
    """Rank the rows not yet labelled and make the next round's project from the top `n`."""
    from domaintune.annotate.config import load_task
    from domaintune.annotate.items import candidate_rows
    from domaintune.annotate.project import create_project

    task = load_task(task_path)
    sample = task.sample.model_copy(update={"exclude": [*task.sample.exclude, *map(Path, labelled)]})
    rows = candidate_rows(cfg, sample)
    intent = next((s.name for s in task.schema_ if s.kind == "single"), None)
    scores = scorer(rows) if scorer else score_rows(cfg, rows, method, intent, labelled)
    ranking = rank_rows(rows, scores)
    by_id = {r["id"]: r for r in rows}
    chosen = [by_id[r["id"]] for r in ranking[:n]]
    name = f"{task.name}-r{len(labelled) + 1}"
    folder = Path(out_dir or cfg.layout.root / "annotate" / name)
    task = task.model_copy(update={"name": name})
    create_project(folder, task, chosen, {"selected_by": method, "labelled": [str(p) for p in labelled]})
    write_jsonl(folder / "ranking.jsonl", ranking)
    return {"folder": str(folder), "items": len(chosen), "ranking": str(folder / "ranking.jsonl")}
