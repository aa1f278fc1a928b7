"""Commands of the export stage."""

from __future__ import annotations

import typer
from rich.table import Table

from domaintune.cli.common import ConfigArg, OutputDirOpt, SetOpt, friendly_errors, load, result_console

out = result_console()


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _with_ratio(value, ratio, spec: str) -> str:
    if value is None:
        return "-"
    return format(value, spec) + ("" if ratio is None else f" ({ratio:.2f}x)")


def _with_delta(value, delta, spec: str) -> str:
    if value is None:
        return "-"
    return format(value, spec) + ("" if delta is None else f" ({delta:+.2f})")


def export_summary(manifest: dict) -> Table:
    quality = manifest.get("quality", {}).get("metric") or "quality"
    table = Table(title=f"export of {manifest['project']} ({manifest['seconds']} s); ratios and deltas vs merged")
    for col in ("artefact", "MB (x)", "load s", "tok/s (x)", "ppl (delta)", f"{quality} (delta)", "check"):
        table.add_column(col, justify="left" if col in ("artefact", "check") else "right")
    for name, entry in manifest["artifacts"].items():
        check = ""
        verified = entry.get("verified")
        if verified:
            lg = verified["logits_vs_merged"]
            check = (
                f"logit err {lg['relative_error']:.1e}, argmax {lg['argmax_agreement']:.0%}, "
                f"greedy {verified['greedy_common_prefix']}/{verified['greedy_tokens']}"
            )
        elif "logits_vs_merged" in entry:
            lg = entry["logits_vs_merged"]
            check = f"logit err {lg['relative_error']:.1e}, argmax {lg['argmax_agreement']:.0%}"
        elif "sparsity" in entry:
            check = f"sparsity {entry['sparsity']['achieved']:.1%}"
        table.add_row(
            name,
            _with_ratio(entry["bytes"] / 1e6, entry.get("size_ratio_vs_merged"), ",.1f"),
            _fmt(entry.get("load_s"), ".2f"),
            _with_ratio(entry.get("speed", {}).get("tokens_per_s"), entry.get("speed_ratio_vs_merged"), ".1f"),
            _with_delta(entry.get("metric", {}).get("perplexity"), entry.get("perplexity_delta_vs_merged"), ".3f"),
            _with_delta(entry.get("quality", {}).get("mean"), entry.get("quality_delta_vs_merged"), ".2f"),
            check,
        )
    return table


@friendly_errors
def export_cmd(config: ConfigArg, set_: SetOpt = None, output_dir: OutputDirOpt = None) -> None:
    """Merge the trained adapter, quantise (INT8; bitsandbytes on GPU), write GGUF f16/q8_0 + Ollama Modelfile.

    Reads `<run>/model`, writes `<run>/export/` (merged/, int8/, gguf/, manifest.json with sha256 of every file)
    and reports size, load time, speed and perplexity change of each artefact against the merged model.

    Example: domaintune export examples/medical-zh.yaml --set export.prune_sparsity=0.3
    """
    from domaintune.export.runner import run_export

    cfg = load(config, set_, output_dir)
    manifest = run_export(cfg, cfg.layout)
    out.print(export_summary(manifest))
    if manifest["merge"].get("adapter"):
        out.print(
            f"merge check: max |logit diff| base+adapter vs merged = {manifest['merge']['max_abs_logit_diff']:.2e}"
        )
    metric = manifest["metric"]
    out.print(f"perplexity: {metric['description'] or metric['skipped']}")
    quality = manifest.get("quality", {})
    out.print(f"{quality.get('metric')}: {quality.get('description') or quality.get('skipped')}")
    out.print(f"manifest: {cfg.layout.export_manifest} ({len(manifest['files'])} files, sha256)")


def register(app: typer.Typer) -> None:
    """Adds the export stage's commands to the root app."""
    app.command("export")(export_cmd)
