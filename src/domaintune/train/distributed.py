"""Multi-process training: torchrun launch, and the `train.distributed` settings mapped onto TrainingArguments.

Nothing here trains: DDP, FSDP (torch FSDP2 through accelerate) and DeepSpeed ZeRO are driven by the HF
Trainer's own `ddp_backend` / `ddp_timeout` / `fsdp` / `fsdp_config` / `deepspeed` options, and processes are
started by `torch.distributed.run` (torchrun), which also stops every worker when one fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from domaintune.errors import UserError
from domaintune.train.config import DistributedSettings, TrainConfig
from domaintune.utils.io import atomic_write

LAUNCH_ENV = ("LOCAL_RANK", "WORLD_SIZE", "RANK")


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def current_world() -> World:
    """Rank and world size as torchrun sets them (a plain process: rank 0 of 1)."""
    if not all(name in os.environ for name in LAUNCH_ENV):
        return World()
    return World(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in LAUNCH_ENV)


def resolve_backend(settings: DistributedSettings) -> str:
    import torch

    if settings.backend != "auto":
        if settings.backend == "nccl" and not torch.cuda.is_available():
            raise UserError("train.distributed.backend: nccl needs CUDA GPUs; use gloo (or auto) on CPUs")
        return settings.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def per_device_batch_size(tcfg: TrainConfig, world: World) -> int:
    """`train.batch_size` is the batch over all processes; each process takes an equal share."""
    if tcfg.batch_size % world.world_size:
        raise UserError(
            f"train.batch_size: {tcfg.batch_size} does not divide over {world.world_size} processes; use a multiple "
            f"of {world.world_size} (batch_size is the batch over all processes, each takes batch_size / N)"
        )
    return tcfg.batch_size // world.world_size


def check_supported(tcfg: TrainConfig, train_dir: Path) -> None:
    """What this machine cannot run fails before any process starts, with the reason."""
    strategy = tcfg.distributed.strategy
    if strategy != "deepspeed":
        return
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise UserError(
            "train.distributed deepspeed: deepspeed is not installed: pip install 'domaintune[distributed]'"
        )
    write_deepspeed_config(tcfg, train_dir)  # generated and validated by DeepSpeed's own config parser


def check_launch(tcfg: TrainConfig, world: World, train_dir: Path) -> None:
    strategy = tcfg.distributed.strategy
    if world.distributed and strategy == "none":
        raise UserError(
            f"started as {world.world_size} processes but train.distributed is `none`: "
            "set train.distributed to ddp, fsdp or deepspeed (e.g. --set train.distributed=ddp)"
        )
    check_supported(tcfg, train_dir)
    if strategy in ("fsdp", "deepspeed") and not launched_by_torchrun():
        raise UserError(
            f"train.distributed {strategy} runs under torchrun: use `domaintune train CONFIG --nproc N` "
            "(N may be 1), or start `torchrun ... -m domaintune train CONFIG` yourself"
        )


def init_process_group(settings: DistributedSettings):
    """Start the process group now (the Trainer reuses it), so rank 0 can prepare folders and others wait."""
    from accelerate import PartialState

    kwargs: dict[str, Any] = {"timeout": timedelta(minutes=settings.timeout_minutes)}
    if settings.strategy == "deepspeed":
        # As TrainingArguments does it: accelerate starts DeepSpeed's own comm layer when this is set. The
        # backend is named (nccl, or gloo on CPUs, where DeepSpeed runs on its CPU accelerator), so accelerate
        # also counts the processes on CPU-only machines; TrainingArguments then keeps this state
        # (accelerator_config use_configured_state).
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        try:
            return PartialState(backend=resolve_backend(settings), **kwargs)
        finally:
            del os.environ["ACCELERATE_USE_DEEPSPEED"]
    else:
        kwargs["backend"] = resolve_backend(settings)
        import torch

        if not torch.cuda.is_available():
            kwargs["cpu"] = True
    return PartialState(**kwargs)


@dataclass
class Session:
    """This process's part in a training job: its rank, the process group (when torchrun started several
    processes with a strategy), and its share of the batch."""

    tcfg: TrainConfig
    world: World
    state: Any = None  # accelerate's PartialState once a process group runs
    per_device_batch: int = 1

    @property
    def active(self) -> bool:
        return self.state is not None

    @property
    def sharded_head(self) -> bool:
        """FSDP and ZeRO-3 shard the output head, so it cannot be called outside the model's forward."""
        settings = self.tcfg.distributed
        return self.active and (
            settings.strategy == "fsdp" or (settings.strategy == "deepspeed" and settings.deepspeed.zero_stage == 3)
        )

    def barrier(self) -> None:
        """Every rank waits here for the others (nothing to wait for in a single process)."""
        if self.state is not None:
            self.state.wait_for_everyone()

    def trainer_arguments(self, model, train_dir: Path) -> dict[str, Any]:
        """TrainingArguments for the strategy and this process's batch share."""
        args: dict[str, Any] = {"per_device_batch_size": self.per_device_batch}
        args.update(training_arguments(self.tcfg, self.world, model, train_dir))
        if "deepspeed" in args:
            args["deepspeed"] = deepspeed_config(self.tcfg)  # validated by check_launch
        return args

    def prepare_trainer(self, trainer) -> None:
        """The strategy's hooks on a built Trainer, then a check that the Trainer really runs the strategy."""
        if not self.active:
            return
        if self.tcfg.distributed.strategy == "fsdp":
            enable_fsdp_on_cpu(trainer)
            create_checkpoint_folder_first(trainer)
        check_strategy_active(trainer, self.tcfg)

    def summary(self) -> dict[str, Any]:
        """What train/metrics.json records under `distributed`."""
        return {
            "strategy": self.tcfg.distributed.strategy if self.active else "none",
            "world_size": self.world.world_size,
            "per_device_batch_size": self.per_device_batch,
            "global_batch_size": self.per_device_batch * self.world.world_size,
            "backend": None if self.state is None else str(self.state.backend),
        }


def start_session(tcfg: TrainConfig, train_dir: Path) -> Session:
    """Check the launch, start the process group under torchrun, and split the batch over the processes."""
    world = current_world()
    check_launch(tcfg, world, train_dir)
    state = None
    if launched_by_torchrun() and tcfg.distributed.strategy != "none":
        state = init_process_group(tcfg.distributed)
    return Session(tcfg, world, state, per_device_batch_size(tcfg, world))


# --------------------------------------------------------------------------- TrainingArguments


def wrap_class_name(model, settings: DistributedSettings) -> str:
    """The decoder layer class FSDP wraps as one unit: configured, or the model's `_no_split_modules`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    present = {type(m).__name__ for m in base.modules()}
    wanted = settings.fsdp.wrap_class
    if wanted:
        if wanted not in present:
            layer_like = sorted(n for n in present if "Layer" in n or "Block" in n)
            raise UserError(
                f"train.distributed.fsdp.wrap_class: {wanted} is not in the model; candidates: {layer_like}"
            )
        return wanted
    for name in getattr(base, "_no_split_modules", None) or []:
        if name in present:
            return name
    raise UserError(
        f"train.distributed.fsdp: cannot tell the decoder layer class of {type(base).__name__}; "
        "set train.distributed.fsdp.wrap_class"
    )


def training_arguments(tcfg: TrainConfig, world: World, model, train_dir: Path) -> dict[str, Any]:
    """Extra TrainingArguments for the configured strategy (empty for a single plain process)."""
    settings = tcfg.distributed
    if settings.strategy == "none" or not launched_by_torchrun():
        return {}
    args: dict[str, Any] = {"ddp_timeout": int(settings.timeout_minutes * 60)}
    if settings.strategy != "deepspeed":
        args["ddp_backend"] = resolve_backend(settings)
    if settings.strategy == "ddp":
        # Every trainable parameter takes part in the loss: no extra autograd graph traversal per step.
        args["ddp_find_unused_parameters"] = False
    elif settings.strategy == "fsdp":
        fsdp = settings.fsdp
        args["fsdp"] = True
        args["fsdp_config"] = {
            "version": 2,
            "reshard_after_forward": fsdp.sharding == "full_shard",
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": [wrap_class_name(model, settings)],
            # Checkpoints: one shard per rank (torch.distributed.checkpoint); model/ is consolidated at the end.
            "state_dict_type": "SHARDED_STATE_DICT",
            "cpu_offload": fsdp.cpu_offload,
            "activation_checkpointing": fsdp.activation_checkpointing,
            # Every rank loads the (small enough) base model itself; no meta-device loading.
            "cpu_ram_efficient_loading": False,
        }
    elif settings.strategy == "deepspeed":
        args["deepspeed"] = str(train_dir / "deepspeed.json")
        # Keep the process group started by init_process_group (TrainingArguments would otherwise reset it).
        args["accelerator_config"] = {"use_configured_state": True}
    return args


# --------------------------------------------------------------------------- DeepSpeed


def deepspeed_config(tcfg: TrainConfig) -> dict[str, Any]:
    """DeepSpeed JSON from the YAML; `auto` values are filled by transformers from the TrainingArguments."""
    ds = tcfg.distributed.deepspeed
    if ds.config_file is not None:
        try:
            return json.loads(Path(ds.config_file).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UserError(f"train.distributed.deepspeed.config_file: {ds.config_file}: {exc}") from None
    zero: dict[str, Any] = {
        "stage": ds.zero_stage,
        "overlap_comm": False,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    if ds.zero_stage == 2:
        zero["allgather_partitions"] = True
        zero["allgather_bucket_size"] = 200_000_000
        zero["reduce_scatter"] = True
    else:
        zero["stage3_prefetch_bucket_size"] = "auto"
        zero["stage3_param_persistence_threshold"] = "auto"
        zero["stage3_max_live_parameters"] = 1_000_000_000
        zero["stage3_max_reuse_distance"] = 1_000_000_000
        # The final model/ must be a plain folder: gather the full weights on rank 0 when saving.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config: dict[str, Any] = {
        # train.batch_size is the batch over all processes already (per step, before accumulation).
        "train_batch_size": tcfg.batch_size * tcfg.gradient_accumulation_steps,
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        # Offloaded optimizer state is stepped by DeepSpeed's CPU Adam: name the optimizer so DeepSpeed builds it.
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
        }
    if ds.offload_param == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return config


def validate_deepspeed_config(config: dict[str, Any], tcfg: TrainConfig) -> list[str]:
    """Problems in a DeepSpeed config: DeepSpeed's own `DeepSpeedConfig` parses it (when deepspeed is installed)
    with the `auto` values filled the way the transformers integration fills them for one process."""
    problems: list[str] = []
    zero = config.get("zero_optimization", {})
    if zero.get("stage") not in (0, 1, 2, 3):
        problems.append(f"zero_optimization.stage must be 0-3, got {zero.get('stage')!r}")
    if "offload_param" in zero and zero.get("stage") != 3:
        problems.append("zero_optimization.offload_param needs stage 3")
    try:
        from deepspeed.runtime.config import DeepSpeedConfig
    except Exception:
        return problems
    filled = json.loads(json.dumps(config))
    values = {
        "train_batch_size": tcfg.batch_size * tcfg.gradient_accumulation_steps,
        "train_micro_batch_size_per_gpu": tcfg.batch_size,
        "gradient_accumulation_steps": tcfg.gradient_accumulation_steps,
        "gradient_clipping": 1.0,
    }
    for key, value in values.items():
        if filled.get(key) == "auto":
            filled[key] = value
    for key, on in (("bf16", tcfg.precision == "bf16"), ("fp16", tcfg.precision == "fp16")):
        if isinstance(filled.get(key), dict) and filled[key].get("enabled") == "auto":
            filled[key]["enabled"] = on
    for key, value in list(filled.get("zero_optimization", {}).items()):
        if value == "auto":
            filled["zero_optimization"][key] = int(5e7)
    params = filled.get("optimizer", {}).get("params", {})
    auto_params = {"lr": tcfg.learning_rate, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": tcfg.weight_decay}
    for key, value in list(params.items()):
        if value == "auto":
            params[key] = auto_params.get(key, value)
    try:
        DeepSpeedConfig(filled)
    except Exception as exc:
        problems.append(f"{type(exc).__name__}: {exc}")
    return problems


def write_deepspeed_config(tcfg: TrainConfig, train_dir: Path) -> Path:
    config = deepspeed_config(tcfg)
    problems = validate_deepspeed_config(config, tcfg)
    if problems:
        raise UserError("train.distributed.deepspeed: invalid DeepSpeed config: " + "; ".join(problems))
    path = train_dir / "deepspeed.json"
    with atomic_write(path) as handle:
        handle.write(json.dumps(config, indent=2) + "\n")
    return path


# --------------------------------------------------------------------------- launch


@dataclass(frozen=True)
class LaunchSpec:
    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int = 29500


def torchrun_argv(spec: LaunchSpec, child_args: list[str]) -> list[str]:
    """`python -m torch.distributed.run ... -m domaintune <child_args>` for this node."""
    argv = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={spec.nproc}"]
    if spec.nnodes == 1 and spec.master_addr is None:
        argv.append("--standalone")  # picks a free port on this machine
    else:
        if spec.master_addr is None:
            raise UserError("--nnodes > 1 needs --master-addr (the address of the node with --node-rank 0)")
        argv += [
            f"--nnodes={spec.nnodes}",
            f"--node-rank={spec.node_rank}",
            f"--master-addr={spec.master_addr}",
            f"--master-port={spec.master_port}",
        ]
    argv += ["--max-restarts=0", "--monitor-interval=1", "-m", "domaintune", *child_args]
    return argv


def launch(spec: LaunchSpec, child_args: list[str]) -> int:
    """Run torchrun for this node and return its exit status (non-zero when any rank failed)."""
    if spec.nproc < 1 or spec.nnodes < 1 or not 0 <= spec.node_rank < spec.nnodes:
        raise UserError(f"--nproc {spec.nproc} --nnodes {spec.nnodes} --node-rank {spec.node_rank}: invalid")
    env = dict(os.environ)
    # One CPU thread per process unless the user chose otherwise (torchrun's own default, stated here).
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    proc = subprocess.run(torchrun_argv(spec, child_args), env=env)
    return proc.returncode


def enable_fsdp_on_cpu(trainer) -> None:
    """Switch the Trainer's own FSDP2 plugin on when running on CPUs.

    accelerate turns `fsdp_plugin` into DistributedType.FSDP only on accelerator devices (CUDA, XPU, NPU...); on
    CPUs it silently keeps plain multi-CPU DDP. torch's FSDP2 (`fully_shard`) itself runs on CPU with gloo, so
    we give the same plugin to the accelerator state here; everything after that (wrapping, sharded
    optimizer, checkpoints, state-dict gathering) is accelerate's and the Trainer's own FSDP code.
    """
    import torch

    args = trainer.args
    if getattr(args, "fsdp_plugin_args", None) is None or trainer.is_fsdp_enabled or torch.cuda.is_available():
        return
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise UserError(f"train.distributed fsdp: accelerate chose {state.distributed_type}, not FSDP")
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    state.distributed_type = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


def create_checkpoint_folder_first(trainer) -> None:
    """Make each rank create the checkpoint folder before the Trainer checks which checkpoint is the best.

    With sharded FSDP checkpoints the Trainer writes nothing in `save_model`; the folder appears only later, in
    the optimizer/shard saving, yet right after `save_model` (and a barrier) each rank records the best
    checkpoint only `if os.path.exists(folder)`. Ranks then disagree on `best_model_checkpoint` (seen here:
    rank 0 checkpoint-3, rank 1 checkpoint-6), and the final best-model reload deadlocks with mismatched
    collectives. Creating the (empty) folder first gives every rank the same answer.
    """
    original = trainer.save_model

    def save_model(output_dir=None, _internal_call: bool = False):
        if _internal_call and output_dir is not None:
            os.makedirs(output_dir, exist_ok=True)
        return original(output_dir, _internal_call=_internal_call)

    trainer.save_model = save_model


def check_strategy_active(trainer, tcfg: TrainConfig) -> None:
    """Fail instead of silently training with another strategy than the configured one."""
    strategy = tcfg.distributed.strategy
    if strategy == "fsdp" and not trainer.is_fsdp_enabled:
        raise UserError(
            "train.distributed fsdp: the Trainer did not enable FSDP (accelerate state "
            f"{trainer.accelerator.state.distributed_type})"
        )
    if strategy == "deepspeed" and not trainer.is_deepspeed_enabled:
        raise UserError(
            "train.distributed deepspeed: the Trainer did not enable DeepSpeed (accelerate state "
            f"{trainer.accelerator.state.distributed_type})"
        )


def save_fsdp_consolidated(trainer, unwrapped, out: Path) -> None:
    """Gather the FSDP-sharded weights onto rank 0 and write a plain transformers / peft folder there.

    A collective: every rank calls it. Saving goes through a fresh (meta-device) copy of the model on rank 0,
    so transformers' save_pretrained never touches the sharded DTensors of the training model.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(
        trainer.model_wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if not trainer.args.should_save:
        return
    out.mkdir(parents=True, exist_ok=True)
    from peft import PeftModel

    if isinstance(unwrapped, PeftModel):
        unwrapped.save_pretrained(str(out), state_dict=state)
        return
    import torch
    from transformers import AutoModelForCausalLM

    first = next(iter(state.values()))
    dtype = first.dtype if isinstance(first, torch.Tensor) else torch.float32
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(unwrapped.config, dtype=dtype)
    _, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    plain.tie_weights()
    still_meta = [name for name, p in plain.named_parameters() if p.is_meta]
    if unexpected or still_meta:
        raise RuntimeError(f"FSDP consolidation: unexpected keys {unexpected[:5]}, missing {still_meta[:5]}")
    if getattr(unwrapped, "generation_config", None) is not None:
        plain.generation_config = unwrapped.generation_config
    plain.save_pretrained(str(out), safe_serialization=True)
