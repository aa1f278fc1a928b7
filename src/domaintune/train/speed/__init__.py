"""The CPU speed levers of the train stage, switched on from one place (`train.speed` in the YAML).

Each lever lives in its own module and is tested to train the same thing as what it replaces
(docs/train-performance.md has the measurements):

- `allocator`: glibc malloc keeps freed buffers for reuse (`keep_freed_buffers`);
- `cpu_attention`: the `domaintune_cpu` attention kernel (`attention`);
- `lora_cast`: no fp32 round trip of LoRA inputs under autocast (always on with bf16/fp16);
- `fast_dropout`: LoRA dropout masks from 16 random bits per element (`cheap_mask_dropout`);
- `fused_lora`: one autograd node per plain LoRA linear layer (`fused_lora_linear`);
- `fused_head`: the loss projects only the label tokens onto the vocabulary (`fused_head_loss`).

Two moments: `base_dtype` decides, before the base model is loaded, whether its frozen weights are held in
half precision (`half_precision_base`); `apply` switches everything else on once the trainable model exists
and returns what was engaged and why (train/metrics.json records it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from domaintune.train.config import ADAPTER_METHODS

if TYPE_CHECKING:
    from domaintune.train.config import TrainConfig

# Levers that act on LoRA layers, and the methods whose adapters have them.
_LORA_DROPOUT_METHODS = ("lora", "dora", "qlora")
_FUSED_LORA_METHODS = ("lora",)  # the fused node is plain LoRA's arithmetic (no DoRA magnitude, no 4-bit base)


def _half_precision_base(tcfg: TrainConfig) -> tuple[bool, str]:
    method = tcfg.trained_as
    if not tcfg.speed.half_precision_base:
        return False, "off (train.speed.half_precision_base)"
    if tcfg.precision == "fp32":
        return False, "precision fp32"
    if method not in ADAPTER_METHODS or method == "qlora":
        return False, f"method {method} trains the base weights (or quantises them)"
    return True, f"frozen base held in {tcfg.precision} under {tcfg.precision} autocast"


def base_dtype(tcfg: TrainConfig, model_dtype: str) -> str:
    """The dtype to load the base model in: `model.dtype`, or the autocast dtype for a frozen adapter base."""
    half, _ = _half_precision_base(tcfg)
    if not half:
        return model_dtype
    return "bfloat16" if tcfg.precision == "bf16" else "float16"


def apply(model, tcfg: TrainConfig, *, sharded_head: bool = False) -> dict[str, Any]:
    """Switch the configured levers on for `model` (the trainable model, adapters in place) and this process.

    Returns {lever: what was engaged} for the levers that apply to this method (attention always; counts of
    changed layers for the LoRA levers; `fused_head_loss` when the Trainer computes the label-token loss), the
    malloc setting under `allocator`, and `why`: one line per lever saying why it is on or off.
    `sharded_head`: FSDP or ZeRO-3 shard the output head, so it cannot be called outside the model's forward.
    """
    import torch

    speed = tcfg.speed
    method = tcfg.trained_as
    engaged: dict[str, Any] = {}
    why: dict[str, str] = {"half_precision_base": _half_precision_base(tcfg)[1]}

    engaged["allocator"], why["keep_freed_buffers"] = _allocator(speed.keep_freed_buffers, torch.cuda.is_available())
    engaged["attention"], why["attention"] = _attention(model, speed.attention)

    if method == "lora" and tcfg.precision != "fp32":
        from domaintune.train.speed.lora_cast import skip_lora_input_cast

        engaged["lora_input_cast"] = skip_lora_input_cast(model)
        why["lora_input_cast"] = f"{tcfg.precision} autocast: LoRA layers take half-precision input as it is"
    else:
        why["lora_input_cast"] = "precision fp32" if method == "lora" else f"method {method} has no plain LoRA layers"

    if method in _LORA_DROPOUT_METHODS and speed.cheap_mask_dropout:
        from domaintune.train.speed.fast_dropout import use_cheap_mask_dropout

        engaged["cheap_mask_dropout"] = use_cheap_mask_dropout(model)
        why["cheap_mask_dropout"] = "LoRA dropout masks from 16 random bits per element (CPU forwards)"
    else:
        why["cheap_mask_dropout"] = _off(speed.cheap_mask_dropout, "cheap_mask_dropout", method, "LoRA dropout")

    if method in _FUSED_LORA_METHODS and speed.fused_lora_linear:
        from domaintune.train.speed.fused_lora import use_fused_lora_linear

        engaged["fused_lora_linear"] = use_fused_lora_linear(model)
        why["fused_lora_linear"] = "plain LoRA linear layers run as one autograd node (CPU training forwards)"
    else:
        why["fused_lora_linear"] = _off(speed.fused_lora_linear, "fused_lora_linear", method, "plain LoRA layers")

    if tcfg.trainer_loss == "label_tokens":
        engaged["fused_head_loss"], why["fused_head_loss"] = _fused_head(model, speed.fused_head_loss, sharded_head)
    else:
        why["fused_head_loss"] = f"the {tcfg.trainer_loss} loss computes its own logits"
    engaged["why"] = why
    return engaged


def _off(switch: bool, name: str, method: str, what: str) -> str:
    return f"off (train.speed.{name})" if not switch else f"method {method} has no {what}"


def _allocator(switch: bool, cuda: bool) -> tuple[dict[str, Any], str]:
    if not switch:
        return {"malloc": "unchanged"}, "off (train.speed.keep_freed_buffers)"
    if cuda:
        return {"malloc": "unchanged"}, "a CUDA machine: the step's buffers live on the GPU"
    from domaintune.train.speed.allocator import keep_freed_buffers

    setting = keep_freed_buffers()
    return setting, setting.get("reason", setting["malloc"])


def _attention(model, choice: str) -> tuple[str, str]:
    from domaintune.train.speed.cpu_attention import auto_choice, select_attention

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if choice == "auto":
        _, reason = auto_choice(base.config)
    else:
        reason = "set by train.speed.attention"
    return select_attention(base, choice), reason


def _fused_head(model, switch: bool, sharded_head: bool) -> tuple[bool, str]:
    from domaintune.train.speed.fused_head import fused_head_supported

    if not switch:
        return False, "off (train.speed.fused_head_loss): logits at the positions any row labels"
    if sharded_head:
        return False, "FSDP / ZeRO-3 shard the output head: logits at the positions any row labels"
    if not fused_head_supported(model):
        return False, "the model scales or soft-caps logits after its head (or the head has a bias)"
    return True, "only the label tokens are projected onto the vocabulary"
