"""`domaintune doctor` and `domaintune estimate`."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from domaintune.cli.common import ConfigArg, OutputDirOpt, SetOpt, friendly_errors, load, result_console


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _estimate_table(plan, target) -> Table:
    from domaintune.hardware.plan import stage_seconds

    table = Table(
        "method",
        "trainable",
        "memory GiB",
        "fits",
        "tokens/s",
        "run time",
        "train stage",
        title=f"{target.name} ({target.memory_gib:.0f} GiB, {target.peak_tflops:.2f} TFLOP/s usable peak"
        + (f", decode step {target.decode_step_seconds:.3f} s" if plan.decode_steps else "")
        + ")",
    )
    for est in target.estimates:
        fits = est.total_gib <= target.memory_gib * 0.95
        note = "" if target.supported(est.method) else " (needs CUDA)"
        table.add_row(
            est.method + note,
            f"{est.trainable_params / 1e6:.2f}M",
            f"{est.total_gib:.2f}",
            "[green]yes[/]" if fits else "[red]no[/]",
            f"{est.tokens_per_s:,.0f}",
            _duration(est.run_seconds),
            _duration(stage_seconds(plan, target, est)),
        )
    return table


def _gguf_cache_line() -> str:
    from domaintune.errors import UserError
    from domaintune.llamacpp.cache import CACHE_MAX_ENV, cache_entries, cache_max_bytes, gguf_cache_root

    root = gguf_cache_root()
    entries = cache_entries(root)
    used = f"{root}: {sum(size for _, size, _ in entries) / 1e9:.2f} GB in {len(entries)} folders"
    try:
        return f"{used}, cap {cache_max_bytes() / 1e9:.2f} GB ({CACHE_MAX_ENV})"
    except UserError as err:
        return f"{used}, cap unreadable: {err}"


def register(app: typer.Typer) -> None:
    @app.command("doctor")
    def doctor() -> None:
        """Print library versions, devices (CPU features, CUDA), the bundled model, and what is missing.

        Example: domaintune doctor
        """
        from domaintune.hardware.doctor import run_checks

        hardware, versions, checks = run_checks()
        out = result_console()
        out.print(f"[bold]CPU[/] {hardware.cpu_model}: {hardware.cpu_cores} cores, {hardware.memory_gib:.1f} GiB RAM")
        simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in hardware.cpu_flags]
        out.print(f"[bold]CPU features[/] {', '.join(simd) or 'none of avx2/avx512/amx'}")
        out.print(f"[bold]GGUF cache[/] {escape(_gguf_cache_line())}")
        table = Table("package", "version", title="libraries")
        for name, version in versions.items():
            table.add_row(name, version or "[dim]not installed[/]")
        out.print(table)
        table = Table("feature", "status", "detail", "fix", title="capabilities")
        for check in checks:
            table.add_row(
                escape(check.feature),
                "[green]ok[/]" if check.ok else "[yellow]missing[/]",
                escape(check.detail),
                escape(check.fix),
            )
        out.print(table)

    @app.command("estimate")
    @friendly_errors
    def estimate(
        config: ConfigArg,
        set_: SetOpt = None,
        output_dir: OutputDirOpt = None,
        gpu: Annotated[
            list[str] | None,
            typer.Option("--gpu", help="Also estimate for a named GPU, e.g. A100-80G, 'RTX 3090-24G'. Repeatable."),
        ] = None,
    ) -> None:
        """Memory and time of every training method for this model, sequence length and batch, before training.

        Example: domaintune estimate examples/medical-zh.yaml --gpu A100-80G --gpu "RTX 3090-24G"
        """
        from domaintune.hardware.estimate import NAMED_GPUS
        from domaintune.hardware.plan import plan_estimates

        for name in gpu or []:
            if name not in NAMED_GPUS:
                from domaintune.errors import UserError

                raise UserError(f"--gpu {name!r}: unknown; choose from {', '.join(NAMED_GPUS)}")
        cfg = load(config, set_, output_dir)
        plan = plan_estimates(cfg, gpus=gpu or [])
        out = result_console()
        out.print(plan.header)
        for target in plan.targets:
            out.print(_estimate_table(plan, target))
        out.print(plan.footer)
