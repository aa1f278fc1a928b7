"""`data.augment`: augmentation and synthesis of the train split.

`run_augment` is called by the data stage after the split with the train rows only, so synthetic
rows never reach val/test. Each op's rows carry `origin: synthetic/<op>` and `derived_from`
(the source row ids); the report counts, per op, rows created, source rows used, rejections by
check and generator failures (those items go to quarantine.jsonl, the run goes on).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from domaintune.annotate.judge import JUDGED_OPS, apply_judge
from domaintune.data.augment.config import AugmentConfig, GeneratorConfig
from domaintune.data.augment.generator import CachedGenerator, make_generator
from domaintune.data.augment.ops import (
    Context,
    back_translate,
    balance,
    lexical,
    paraphrase,
    question_answer,
    records_to_dialogue,
    synthetic_qa,
)
from domaintune.data.ledger import Ledger
from domaintune.data.progress import items_progress

if TYPE_CHECKING:
    from domaintune.config import ProjectConfig

__all__ = ["AugmentConfig", "GeneratorConfig", "run_augment"]


def run_augment(
    cfg: ProjectConfig, train_rows: list[dict[str, Any]], data_dir: Path, ledger: Ledger, progress: bool = True
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Apply `cfg.data.augment.ops` in order to the train rows; returns (synthetic rows, report section).

    Rejected candidates and generator failures are quarantined in the ledger's `augment` book."""
    acfg = cfg.data.augment
    if acfg is None:
        raise ValueError("run_augment needs a data.augment section")
    cache_dir = Path(acfg.cache_dir) if acfg.cache_dir else data_dir / "augment_cache"
    generators: list[CachedGenerator] = []

    def factory(gcfg: GeneratorConfig) -> CachedGenerator:
        g = CachedGenerator(make_generator(gcfg, cfg.model), gcfg, cache_dir)
        generators.append(g)
        return g

    def counters() -> tuple[int, int, int]:
        return (
            sum(g.hits for g in generators),
            sum(g.generated for g in generators),
            sum(g.failed for g in generators),
        )

    synthetic: list[dict[str, Any]] = []
    summaries = []
    prompts = [question_answer(r)[0] for r in train_rows]
    with items_progress(progress) as bar:
        ctx = Context(cfg, acfg, ledger, bar if progress else None, factory)
        for index, op in enumerate(acfg.ops):
            before = counters()
            if op.op == "records_to_dialogue":
                res = records_to_dialogue(ctx, op, index, train_rows)
            elif op.op == "synthetic_qa":
                res = synthetic_qa(ctx, op, index, train_rows, prompts)
            elif op.op == "paraphrase":
                res = paraphrase(ctx, op, index, train_rows, prompts)
            elif op.op == "back_translate":
                res = back_translate(ctx, op, index, train_rows, prompts)
            elif op.op == "lexical":
                res = lexical(ctx, op, index, train_rows)
            elif op.op == "balance":
                res = balance(ctx, op, index, train_rows + synthetic)
            else:  # pragma: no cover - the config's discriminator admits only the ops above
                raise ValueError(op.op)
            if acfg.judge is not None and op.op in JUDGED_OPS:
                apply_judge(ctx, res, acfg.judge)
            after = counters()
            summary = res.summary()
            if after != before or op.op in ("synthetic_qa", "paraphrase", "back_translate"):
                summary["generator"] = {
                    "cache_hits": after[0] - before[0],
                    "generated": after[1] - before[1],
                    "failed": after[2] - before[2],
                }
            summaries.append(summary)
            synthetic.extend(res.rows)
    by_origin: dict[str, int] = {}
    for r in synthetic:
        by_origin[r["origin"]] = by_origin.get(r["origin"], 0) + 1
    report = {
        "train_rows_in": len(train_rows),
        "created": len(synthetic),
        "by_origin": by_origin,
        "quarantined": sum(s["quarantined"] for s in summaries),
        "cache": str(cache_dir),
        "ops": summaries,
    }
    return synthetic, report
