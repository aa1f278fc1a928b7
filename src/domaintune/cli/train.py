"""Commands of the train stage."""

from __future__ import annotations

from typing import Annotated

import typer

from domaintune.cli.common import ConfigArg, OutputDirOpt, SetOpt, console, friendly_errors, load


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
    from rich.table import Table

    from domaintune.errors import UserError
    from domaintune.train import distributed as dist
    from domaintune.train.runner import run_train

    cfg = load(config, set_, output_dir)
    strategy = cfg.train.distributed.strategy
    if not dist.launched_by_torchrun() and (nproc > 1 or nnodes > 1 or strategy in ("fsdp", "deepspeed")):
        if strategy == "none":
            raise UserError(
                f"--nproc {nproc} --nnodes {nnodes}: train.distributed is `none`; choose ddp, fsdp or deepspeed "
                "(e.g. --set train.distributed=ddp)"
            )
        dist.check_supported(cfg.train, cfg.output_dir / "train")
        child = ["train", str(config.resolve()), "--output-dir", str(cfg.output_dir.resolve())]
        for assignment in set_ or []:
            child += ["--set", assignment]
        if resume:
            child.append("--resume")
        spec = dist.LaunchSpec(nproc, nnodes, node_rank, master_addr, master_port)
        console.print(f"[bold]train[/]: {strategy} on {nproc} process(es) x {nnodes} node(s) through torchrun")
        code = dist.launch(spec, child)
        if code != 0:
            console.print(
                f"[bold red]error:[/] distributed training failed (torchrun exit status {code}); "
                "the failing rank's error is printed above",
                highlight=False,
            )
            raise typer.Exit(code)
        return
    metrics = run_train(cfg, cfg.output_dir, resume=resume)
    if not dist.current_world().is_main:
        return
    table = Table(title=f"train: {cfg.name} ({metrics['method']}, {metrics['model_kind']})", show_header=False)
    table.add_row(
        "steps", f"{metrics['steps']} / {metrics['max_steps']}" + (" (early stop)" if metrics["stopped_early"] else "")
    )
    table.add_row("val loss step 0 -> best", f"{_fmt(metrics['step0_val_loss'])} -> {_fmt(metrics['best_val_loss'])}")
    table.add_row("final train / val loss", f"{_fmt(metrics['final_train_loss'])} / {_fmt(metrics['final_val_loss'])}")
    table.add_row("tokens seen", f"{metrics['tokens_seen']:,}")
    table.add_row("tokens/s (training steps)", _fmt(metrics["tokens_per_second"], ".1f"))
    table.add_row("truncated examples", str(metrics["truncated"]))
    table.add_row("wall time", f"{metrics['wall_seconds']:.1f} s")
    table.add_row("model", str(cfg.output_dir / "model"))
    table.add_row("metrics / curve", f"{cfg.output_dir / 'train' / 'metrics.json'}, loss.png")
    console.print(table)


def register(app: typer.Typer) -> None:
    """Adds the train stage's commands to the root app."""
    app.command("train")(train)
