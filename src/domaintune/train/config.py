"""The `train:` section: method, hyper-parameters, evaluation/checkpoint cadence, replay, tracking."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from domaintune.hardware.autoselect import ThreadCount
from domaintune.train.preference.config import (
    GRPOSettings,
    KTOSettings,
    ORPOSettings,
    PPOSettings,
    RewardSettings,
    SimPOSettings,
)
from domaintune.utils.config_types import ConfigPath, StrictModel

Method = Literal[
    "full", "freeze", "lora", "dora", "qlora", "prefix", "prompt", "ptuning", "ia3", "distill", "dpo",
    "kto", "orpo", "simpo", "reward", "ppo", "grpo",
]  # fmt: skip
ADAPTER_METHODS = ("lora", "dora", "qlora", "prefix", "prompt", "ptuning", "ia3")
PROMPT_LEARNING_METHODS = ("prefix", "prompt", "ptuning")
# Methods whose `model/` is a full model folder rather than a PEFT adapter.
FULL_MODEL_METHODS = ("full", "freeze")


class LoraSettings(StrictModel):
    r: int = Field(8, ge=1, description="LoRA rank.")
    alpha: int = Field(16, ge=1, description="LoRA alpha (scaling = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: str | list[str] = Field(
        "all-linear",
        description="`all-linear`, or module names such as [q_proj, v_proj]; an unknown name fails listing valid ones.",
    )


class FreezeSettings(StrictModel):
    trainable_layers: int = Field(
        2, ge=0, description="Train only the last N decoder layers (0: none; combine with `modules`)."
    )
    modules: list[str] = Field(
        default_factory=list,
        description="Extra parameter-name parts to train as well, e.g. [lm_head, norm] (matched as name components).",
    )


class PromptLearningSettings(StrictModel):
    num_virtual_tokens: int = Field(16, ge=1, description="Virtual tokens for prefix / prompt / ptuning.")
    encoder_hidden_size: int = Field(128, ge=1, description="P-tuning prompt encoder hidden size.")
    init_text: str | None = Field(
        None, description="Prompt tuning only: initialise the virtual tokens from this text instead of randomly."
    )


class IA3Settings(StrictModel):
    target_modules: str | list[str] | None = Field(
        None, description="Modules to rescale; default: peft's choice for the architecture (k, v, down_proj)."
    )
    feedforward_modules: list[str] | None = Field(None, description="Which of target_modules are feed-forward.")


class DistillSettings(StrictModel):
    teacher: str = Field(
        ...,
        description=(
            "Teacher model: a name/folder/hub id as in `model.name_or_path`, a trained `model/` folder (adapter or "
            "full), or `registry://name@alias`. It must share the student's vocabulary."
        ),
    )
    student_method: Literal["full", "lora", "dora"] = Field(
        "full", description="How the student (`model:`) is trained: fully, or through a LoRA/DoRA adapter."
    )
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="Loss = alpha * KL(teacher || student) + (1-alpha) * CE.")
    temperature: float = Field(2.0, gt=0.0, description="Softmax temperature for the KL term (scaled by T^2).")


class DPOSettings(StrictModel):
    path: ConfigPath | None = Field(
        None,
        description=(
            "JSONL of preference pairs: `prompt` (text or messages), `chosen`, `rejected` (text or messages). "
            "Default: the pairs `domaintune feedback export` writes, "
            "<serve.feedback_dir or output_dir/feedback>/preference.jsonl."
        ),
    )
    val_path: ConfigPath | None = Field(None, description="Held-out pairs; default: 10% of `path`.")
    adapter: Literal["full", "lora", "dora", "qlora", "ia3", "prefix", "prompt", "ptuning"] = Field(
        "lora", description="The method DPO trains through (adapter settings come from their own sections)."
    )
    beta: float = Field(0.1, gt=0.0, description="DPO beta (strength of the KL anchor to the reference model).")
    loss_type: Literal[
        "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_zero", "apo_down",
        "sigmoid_norm",
    ] = Field("sigmoid", description="DPO variant (trl's loss_type): sigmoid is DPO; ipo, robust, hinge, apo_zero...")  # fmt: skip
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, description="robust / exo_pair: probability that a preference label is flipped."
    )


class ReplaySettings(StrictModel):
    path: ConfigPath | None = Field(
        None, description="General-data JSONL (messages rows). Default: <output_dir>/data/general.jsonl."
    )
    ratio: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="General rows added per epoch as a fraction of the domain rows (0.1 = 10% extra), resampled each epoch.",
    )


TEXT_METRIC_PATTERN = r"rouge[12L]_(char|word)|bleu|chrf|exact_match|token_f1"  # eval.primary_metric's choices


class GenerationEvalSettings(StrictModel):
    """`train.generation_eval`: answer a few val prompts at every evaluation and score them (train/generation_eval.py)."""

    items: int = Field(
        0,
        ge=0,
        description=(
            "Val prompts answered greedily at every evaluation (the first N rows of val.jsonl), scored and logged as "
            "`eval_<metric>` beside the val loss. 0: off (evaluation is the val loss only). SFT methods only."
        ),
    )
    max_new_tokens: int = Field(64, ge=1, description="Most tokens generated per answer (stops at end of turn).")
    repetition_penalty: float = Field(
        1.0, gt=0.0, description="1.0 = none; set it as eval.decoding.repetition_penalty so both score alike."
    )
    batch_size: int = Field(8, ge=1, description="Prompts generated together (left padding).")
    metric: str | None = Field(
        None, description="Text metric scored (rougeL_char, bleu, chrf, ...). Default: `eval.primary_metric`."
    )

    @model_validator(mode="after")
    def _metric_known(self) -> GenerationEvalSettings:
        import re

        if self.metric is not None and not re.fullmatch(TEXT_METRIC_PATTERN, self.metric):
            raise ValueError(
                f"generation_eval.metric {self.metric!r}: use rouge1/rouge2/rougeL with _char or _word, bleu, chrf, "
                "exact_match or token_f1"
            )
        return self


class FSDPSettings(StrictModel):
    sharding: Literal["full_shard", "shard_grad_op"] = Field(
        "full_shard",
        description=(
            "full_shard: parameters, gradients and optimizer state sharded, parameters re-gathered per layer in "
            "forward and backward (least memory); shard_grad_op: parameters stay gathered after forward (faster, "
            "more memory)."
        ),
    )
    wrap_class: str | None = Field(
        None,
        description=(
            "Decoder layer class wrapped as one FSDP unit; default: the model's own `_no_split_modules` "
            "(e.g. LlamaDecoderLayer)."
        ),
    )
    cpu_offload: bool = Field(False, description="Keep sharded parameters and gradients in CPU memory (GPU runs).")
    activation_checkpointing: bool = Field(False, description="FSDP's own activation checkpointing of each layer.")


class DeepSpeedSettings(StrictModel):
    zero_stage: Literal[2, 3] = Field(
        2, description="ZeRO-2 shards optimizer state and gradients; ZeRO-3 also shards the parameters."
    )
    offload_optimizer: Literal["none", "cpu"] = Field(
        "none", description="`cpu`: optimizer state and step on the CPU (DeepSpeedCPUAdam)."
    )
    offload_param: Literal["none", "cpu"] = Field("none", description="`cpu`: parameters offloaded (ZeRO-3 only).")
    config_file: ConfigPath | None = Field(
        None,
        description=(
            "Use this DeepSpeed JSON instead of generating one from these settings (its `auto` values are still "
            "filled from the train section)."
        ),
    )


class DistributedSettings(StrictModel):
    """`train.distributed`: `none`, `ddp`, `fsdp`, `deepspeed`, or a mapping with `strategy:` and sub-settings."""

    strategy: Literal["none", "ddp", "fsdp", "deepspeed"] = Field(
        "none",
        description=(
            "How `domaintune train --nproc N` (torchrun) shares the work: ddp replicates the model; fsdp shards it "
            "(torch FSDP2); deepspeed uses ZeRO. `none`: a single process."
        ),
    )
    backend: Literal["auto", "nccl", "gloo"] = Field("auto", description="auto: nccl on CUDA GPUs, gloo on CPUs.")
    timeout_minutes: float = Field(
        30.0,
        gt=0,
        description="A collective waiting longer than this (a rank stuck or gone) fails the job instead of hanging.",
    )
    fsdp: FSDPSettings = Field(default_factory=FSDPSettings)
    deepspeed: DeepSpeedSettings = Field(default_factory=DeepSpeedSettings)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value):
        return {"strategy": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self) -> DistributedSettings:
        if self.deepspeed.offload_param == "cpu" and self.deepspeed.zero_stage != 3:
            raise ValueError("deepspeed.offload_param: cpu needs zero_stage 3 (ZeRO-2 does not shard parameters)")
        return self


class SpeedConfig(StrictModel):
    """`train.speed`: the CPU speed levers (docs/train-performance.md), each on by default and tested to train the
    same thing as what it replaces; `train/speed/` switches them on."""

    attention: Literal["auto", "sdpa", "eager", "domaintune_cpu"] = Field(
        "auto",
        description=(
            "Attention kernel for training. auto: `domaintune_cpu` (eager attention with fewer passes over the "
            "scores, train/speed/cpu_attention.py) when training on a CPU a Llama/Mistral/Qwen-style model without "
            "attention dropout, else the model's default (sdpa)."
        ),
    )
    fused_head_loss: bool = Field(
        True,
        description=(
            "Project onto the vocabulary only the tokens that have a label, with one fused head + cross-entropy "
            "(train/speed/fused_head.py); off: logits at every position that any row labels. FSDP, ZeRO-3 and "
            "models that scale or soft-cap logits always use the latter."
        ),
    )
    fused_lora_linear: bool = Field(
        True,
        description=(
            "On CPU, run each plain LoRA linear layer as one autograd node with the rank-r update folded into "
            "the GEMMs (train/speed/fused_lora.py); same arithmetic as peft's five nodes, fewer passes over memory. "
            "DoRA, several adapters, eval and GPUs use peft's forward."
        ),
    )
    cheap_mask_dropout: bool = Field(
        True,
        description=(
            "On CPU, draw each LoRA dropout mask from 16 random bits per element (same drop probability to "
            "within 1e-5, independent per module) instead of torch's bernoulli_, which takes ~28% of a bf16 "
            "LoRA step (train/speed/fast_dropout.py); GPUs keep nn.Dropout."
        ),
    )
    keep_freed_buffers: bool = Field(
        True,
        description=(
            "CPU training on Linux/glibc: raise malloc's mmap and trim thresholds so the step's large buffers "
            "are reused instead of page-faulted in again every step (as jemalloc/tcmalloc would; "
            "train/speed/allocator.py); RSS then stays at the step's peak."
        ),
    )
    half_precision_base: bool = Field(
        True,
        description=(
            "Adapter methods with precision bf16/fp16: hold the frozen base weights in that dtype (adapters and "
            "optimizer stay fp32), saving the per-step weight casts and half the weight memory traffic."
        ),
    )


# Speed switches that lived elsewhere before `train.speed` held them all: old key -> new key.
MOVED_TO_SPEED = {
    "attention": "speed.attention",
    "fused_head_loss": "speed.fused_head_loss",
    "keep_freed_buffers": "speed.keep_freed_buffers",
    "half_precision_base": "speed.half_precision_base",
    "lora.fused_linear": "speed.fused_lora_linear",
    "lora.cheap_mask_dropout": "speed.cheap_mask_dropout",
}


def _moved_keys(data: object) -> list[str]:
    if not isinstance(data, dict):
        return []
    lora = data.get("lora")
    present = {k for k in data if k in MOVED_TO_SPEED}
    if isinstance(lora, dict):
        present |= {f"lora.{k}" for k in lora if f"lora.{k}" in MOVED_TO_SPEED}
    return sorted(present)


class TrainConfig(StrictModel):
    method: Method = Field("lora", description="Fine-tuning method.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA / DoRA / QLoRA settings.")
    freeze: FreezeSettings = Field(default_factory=FreezeSettings)
    prompt_learning: PromptLearningSettings = Field(default_factory=PromptLearningSettings)
    ia3: IA3Settings = Field(default_factory=IA3Settings)
    distill: DistillSettings | None = Field(None, description="Required when method is `distill`.")
    dpo: DPOSettings = Field(default_factory=DPOSettings)
    kto: KTOSettings = Field(default_factory=KTOSettings, description="KTO on unpaired thumbs up/down rows.")
    orpo: ORPOSettings = Field(default_factory=ORPOSettings, description="ORPO (reference-free) on preference pairs.")
    simpo: SimPOSettings = Field(default_factory=SimPOSettings, description="SimPO / CPO (reference-free) on pairs.")
    reward: RewardSettings = Field(default_factory=RewardSettings, description="A reward model from preference pairs.")
    ppo: PPOSettings | None = Field(None, description="Required when method is `ppo` (at least `reward_model:`).")
    grpo: GRPOSettings = Field(
        default_factory=GRPOSettings, description="GRPO with the verifier rewards declared here."
    )
    init_from: str | None = Field(
        None,
        description=(
            "Start from an existing adapter folder (a previous run's `model/`) or `registry://name@alias`; "
            "an adapter keeps its own method settings."
        ),
    )

    max_length: int = Field(512, ge=16, description="Tokens per example; longer ones are truncated and counted.")
    packing: bool = Field(
        False,
        description=(
            "Padding-free batches: each batch is one flattened row with per-example position_ids, so attention and "
            "loss never cross example boundaries. Pays off when lengths in a batch differ a lot; on a CPU, attention "
            "runs over the whole flattened row under a block mask, so with lengths all near max_length padded "
            "batches are faster (docs/train-performance.md)."
        ),
    )
    neftune_noise_alpha: float | None = Field(
        None,
        ge=0.0,
        description=(
            "NEFTune (Jain et al. 2023, 'NEFTune: Noisy Embeddings Improve Instruction Finetuning', "
            "arXiv:2310.05914): during training steps only, add uniform noise in [-a, a], a = alpha / sqrt(L * d) "
            "(L: the batch's sequence length, d: the hidden size), to the input embeddings; evaluation and "
            "generation see none. The paper uses 5 (also 10, 15). transformers' implementation (Trainer's "
            "`neftune_noise_alpha`). SFT methods only (full, freeze, LoRA/DoRA/QLoRA, IA3, prefix, prompt, ptuning), "
            "not with packing (L would be the flattened row's length). None: off."
        ),
    )
    learning_rate: float = Field(2e-4, gt=0.0)
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(0.0, ge=0.0)
    batch_size: int = Field(
        4,
        ge=1,
        description=(
            "Examples per forward/backward, over all processes: with `--nproc N` each process takes batch_size / N "
            "(must divide), so 1 and N processes see the same batches."
        ),
    )
    gradient_accumulation_steps: int = Field(1, ge=1)
    epochs: float = Field(1.0, gt=0.0, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    max_train_samples: int | None = Field(None, ge=1, description="Use only the first N training rows (quick runs).")
    max_val_samples: int | None = Field(200, ge=1, description="Validation rows used for the periodic val loss.")
    gradient_checkpointing: bool = False
    seed: int | None = Field(None, description="Default: the project's seed.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description=(
            "auto: bf16 where the hardware does it natively (CPUs with AVX-512-BF16 or AMX, CUDA GPUs with bf16), "
            "fp16 on older GPUs, fp32 otherwise (train/metrics.json records the choice and why). fp32; bf16 "
            "autocast (kept, with a warning and the measured penalty, on a CPU that emulates it); fp16 (GPU only)."
        ),
    )
    num_threads: ThreadCount = Field(
        "auto",
        description=(
            "torch CPU threads. auto (or null): one per physical core this process may use (affinity, SMT siblings "
            "and cgroup quota considered; shared among the torchrun processes of a machine)."
        ),
    )
    speed: SpeedConfig = Field(
        default_factory=SpeedConfig, description="CPU speed levers, each on by default (docs/train-performance.md)."
    )
    eval_steps: int = Field(50, ge=1, description="Validation loss every N optimizer steps.")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many evaluations without improvement (None: off)."
    )
    early_stopping_min_delta: float = Field(0.0, ge=0.0)
    early_stopping_metric: str = Field(
        "loss",
        description=(
            "What early stopping and the best checkpoint watch: `loss` (val loss, lower is better) or the "
            "generation_eval metric (e.g. rougeL_char, higher is better; needs generation_eval.items > 0)."
        ),
    )
    generation_eval: GenerationEvalSettings = Field(
        default_factory=GenerationEvalSettings,
        description="Greedy answers to a few val prompts, scored at every evaluation (off by default).",
    )
    save_steps: int = Field(50, ge=1, description="Checkpoint every N steps (must be a multiple of eval_steps).")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept (the best one is always kept).")
    logging_steps: int = Field(5, ge=1)

    replay: ReplaySettings = Field(default_factory=ReplaySettings)
    distributed: DistributedSettings = Field(
        default_factory=DistributedSettings,
        description="Multi-process training through torchrun: `none`, `ddp`, `fsdp`, `deepspeed` (see docs/distributed.md).",
    )
    tracking: Literal["tensorboard", "mlflow", "none"] = Field(
        "tensorboard",
        description=(
            "TensorBoard logs in train/tensorboard; `mlflow` logs there as well as to MLflow: the server in "
            "MLFLOW_TRACKING_URI, else a SQLite store in train/mlflow.db (pip install 'domaintune[tracking]')."
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _speed_keys_moved(cls, data: object) -> object:
        moved = _moved_keys(data)
        if moved:
            where = ", ".join(f"train.{old} is now train.{MOVED_TO_SPEED[old]}" for old in moved)
            raise ValueError(f"the speed switches moved into `train.speed`: {where}")
        return data

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.method == "distill" and self.distill is None:
            raise ValueError("method `distill` needs a `train.distill:` section with at least `teacher:`")
        if self.method == "ppo" and self.ppo is None:
            raise ValueError("method `ppo` needs a `train.ppo:` section with at least `reward_model:`")
        if self.method == "grpo" and not self.grpo.rewards:
            raise ValueError("method `grpo` needs at least one reward in `train.grpo.rewards`")
        self._check_generation_eval()
        self._check_neftune()
        effective = self.trained_as
        if self.packing and effective in PROMPT_LEARNING_METHODS:
            raise ValueError(f"packing cannot be used with `{effective}` (virtual tokens are prepended per example)")
        if self.save_steps % self.eval_steps != 0:
            raise ValueError(
                f"save_steps ({self.save_steps}) must be a multiple of eval_steps ({self.eval_steps}) "
                "so the best checkpoint can be kept"
            )
        if effective == "qlora":
            require_cuda_for_qlora()
        if self.precision == "fp16":
            import torch

            if not torch.cuda.is_available():
                raise ValueError("precision fp16 needs a CUDA GPU; on a CPU use `bf16` or `fp32`")
        return self

    def _check_neftune(self) -> None:
        alpha = self.neftune_noise_alpha
        if alpha is None:
            return
        if self.trainer_loss not in ("label_tokens", "model"):
            raise ValueError(
                f"train.neftune_noise_alpha ({alpha}) is for SFT methods only (full, freeze, lora, dora, qlora, ia3, "
                f"prefix, prompt, ptuning); method `{self.method}` cannot use it: remove it or set it to null"
            )
        if self.packing:
            raise ValueError(
                f"train.neftune_noise_alpha ({alpha}) cannot be used with packing: the noise is scaled by "
                "1/sqrt(sequence length) and a packed batch is one flattened row, so each example would get less "
                "noise than the paper's; turn packing off or remove train.neftune_noise_alpha"
            )

    def _check_generation_eval(self) -> None:
        import re

        watched = self.early_stopping_metric
        if watched == "loss":
            return
        if not re.fullmatch(TEXT_METRIC_PATTERN, watched):
            raise ValueError(f"early_stopping_metric {watched!r}: use `loss` or a text metric such as rougeL_char")
        if self.generation_eval.items == 0:
            raise ValueError(f"early_stopping_metric {watched!r} needs generation_eval.items > 0 (it is 0: off)")
        if self.generation_eval.metric not in (None, watched):
            raise ValueError(
                f"early_stopping_metric {watched!r} is not what generation_eval scores ({self.generation_eval.metric!r})"
            )
        if self.trainer_loss in ("dpo", "preference"):
            raise ValueError(f"early_stopping_metric {watched!r}: generation_eval runs for SFT methods only")

    @property
    def trained_as(self) -> str:
        """The method the weights are trained with: DPO's adapter, the distillation student's method, or `method`."""
        if self.method == "dpo":
            return self.dpo.adapter
        if self.method in ("kto", "orpo", "simpo", "reward", "ppo", "grpo"):
            section = getattr(self, self.method)
            return section.adapter if section is not None else "lora"
        if self.method == "distill" and self.distill is not None:
            return self.distill.student_method
        return self.method

    @property
    def trainer_loss(self) -> Literal["dpo", "distill", "model", "label_tokens", "preference"]:
        """Which loss the Trainer computes: trl's DPO, distillation, the model's own (prompt learning: virtual
        tokens shift positions inside peft's forward), or the label-token loss of `train/speed/fused_head.py`."""
        if self.method == "dpo" or self.method == "distill":
            return self.method
        if self.method in ("kto", "orpo", "simpo", "reward", "ppo", "grpo"):
            return "preference"  # trl's trainers (train/preference/trainers.py)
        return "model" if self.trained_as in PROMPT_LEARNING_METHODS else "label_tokens"


def require_cuda_for_qlora() -> None:
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        raise ValueError(
            "method `qlora` quantises the base model to 4-bit NF4 with bitsandbytes, which needs a CUDA GPU; "
            "none is available here: use `lora` (same adapter, unquantised base) on this machine"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("method `qlora` needs bitsandbytes: pip install 'domaintune[gpu]'")
