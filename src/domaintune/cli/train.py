"""Commands of the train stage."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from domaintune.cli.common import ConfigArg, OutputDirOpt, SetOpt, console, friendly_errors, load

if TYPE_CHECKING:
    from domaintune.config import ProjectConfig
    from domaintune.train.distributed import LaunchSpec


def _fmt(value, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


@friendly_errors
def train(
    config: ConfigArg,
    set_: SetOpt = None,
    output_dir: OutputDirOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the last complete checkpoint in <run>/train/checkpoints.")
    ] = False,
    nproc: Annotated[
        int, typer.Option("--nproc", min=1, help="Processes on this machine (one per GPU), started with torchrun.")
    ] = 1,
    nnodes: Annotated[int, typer.Option("--nnodes", min=1, help="Machines taking part (same command on each).")] = 1,
    node_rank: Annotated[int, typer.Option("--node-rank", min=0, help="This machine's index, 0..nnodes-1.")] = 0,
    master_addr: Annotated[
        str | None, typer.Option("--master-addr", help="Address of the --node-rank 0 machine (multi-machine runs).")
    ] = None,
    master_port: Annotated[int, typer.Option("--master-port", help="Free TCP port on the rank-0 machine.")] = 29500,
) -> None:
    """Fine-tune the base model on <run>/data/ with train.method; writes <run>/model and <run>/train.

    With --nproc N (and --nnodes/--node-rank/--master-addr across machines) the command re-launches itself
    through torchrun with train.distributed (ddp, fsdp, deepspeed); see docs/distributed.md.

    Example: domaintune train examples/medical-zh.yaml --set train.max_steps=50
    """
    from domaintune.train import distributed as dist

    cfg = load(config, set_, output_dir)
    strategy = cfg.train.distributed.strategy
    if not dist.launched_by_torchrun() and (nproc > 1 or nnodes > 1 or strategy in ("fsdp", "deepspeed")):
        spec = dist.LaunchSpec(nproc, nnodes, node_rank, master_addr, master_port)
        _launch_through_torchrun(cfg, config, set_, resume, spec)
        return
    from domaintune.train.runner import run_train

    metrics = run_train(cfg, cfg.layout, resume=resume)
    if dist.current_world().is_main:
        _print_summary(cfg, metrics)


def _launch_through_torchrun(
    cfg: ProjectConfig, config: Path, set_: list[str] | None, resume: bool, spec: LaunchSpec
) -> None:
    """Re-run this command as `spec.nproc` torchrun workers on this node; fail with torchrun's exit status."""
    from domaintune.errors import UserError
    from domaintune.train import distributed as dist

    strategy = cfg.train.distributed.strategy
    if strategy == "none":
        raise UserError(
            f"--nproc {spec.nproc} --nnodes {spec.nnodes}: train.distributed is `none`; choose ddp, fsdp or "
            "deepspeed (e.g. --set train.distributed=ddp)"
        )
    layout = cfg.layout
    dist.check_supported(cfg.train, layout.train_dir)
    child = ["train", str(config.resolve()), "--output-dir", str(layout.root.resolve())]
    for assignment in set_ or []:
        child += ["--set", assignment]
    if resume:
        child.append("--resume")
    console.print(f"[bold]train[/]: {strategy} on {spec.nproc} process(es) x {spec.nnodes} node(s) through torchrun")
    code = dist.launch(spec, child)
    if code != 0:
        console.print(
            f"[bold red]error:[/] distributed training failed (torchrun exit status {code}); "
            "the failing rank's error is printed above",
            highlight=False,
        )
        raise typer.Exit(code)


def _print_summary(cfg: ProjectConfig, metrics: dict) -> None:
    from rich.table import Table

    layout = cfg.layout
    m = metrics
    table = Table(title=f"train: {cfg.name} ({m['method']}, {m['model_kind']})", show_header=False)
    table.add_row("steps", f"{m['steps']} / {m['max_steps']}" + (" (early stop)" if m["stopped_early"] else ""))
    table.add_row("val loss step 0 -> best", f"{_fmt(m['step0_val_loss'])} -> {_fmt(m['best_val_loss'])}")
    table.add_row("final train / val loss", f"{_fmt(m['final_train_loss'])} / {_fmt(m['final_val_loss'])}")
    table.add_row("tokens seen", f"{m['tokens_seen']:,}")
    table.add_row("tokens/s (training steps)", _fmt(m["tokens_per_second"], ".1f"))
    table.add_row("truncated examples", str(m["truncated"]))
    table.add_row("wall time", f"{m['wall_seconds']:.1f} s")
    table.add_row("model", str(layout.model_dir))
    table.add_row("metrics / curve", f"{layout.train_metrics}, loss.png")
    console.print(table)


def register(app: typer.Typer) -> None:
    """Adds the train stage's commands to the root app."""
    app.command("train")(train)
