"""Build the trainable model for each `train.method` with peft (adapters) or plain parameter freezing."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from domaintune.errors import UserError
from domaintune.train.config import FULL_MODEL_METHODS, TrainConfig

log = logging.getLogger(__name__)


def linear_module_names(model) -> list[str]:
    """Leaf names of every Linear layer (what `target_modules` may name)."""
    import torch

    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            names.add(name.split(".")[-1])
    return sorted(names)


def check_target_modules(model, target_modules, field: str) -> None:
    if target_modules is None or target_modules == "all-linear":
        return
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    valid = linear_module_names(model)
    unknown = [name for name in target_modules if name not in valid]
    if unknown:
        raise UserError(f"{field}: unknown module name(s) {unknown}; valid names: {valid} or `all-linear`")


def decoder_layers(model):
    """The ModuleList of transformer blocks, for the usual causal-LM layouts."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    for attr in ("layers", "h", "blocks"):
        layers = getattr(base, attr, None)
        if layers is not None:
            return layers
    raise UserError(f"freeze: cannot find the decoder layers of {type(model).__name__}")


def apply_freeze(model, cfg: TrainConfig) -> dict:
    """Train only the last N decoder layers plus parameters whose name contains one of `freeze.modules`."""
    layers = decoder_layers(model)
    n = cfg.freeze.trainable_layers
    if n > len(layers):
        raise UserError(f"train.freeze.trainable_layers: {n} but the model has only {len(layers)} layers")
    components = {part for name, _ in model.named_parameters() for part in name.split(".") if not part.isdigit()}
    unknown = [m for m in cfg.freeze.modules if m not in components]
    if unknown:
        raise UserError(f"train.freeze.modules: unknown module name(s) {unknown}; valid names: {sorted(components)}")
    if n == 0 and not cfg.freeze.modules:
        raise UserError("train.freeze: nothing to train (trainable_layers is 0 and modules is empty)")
    for param in model.parameters():
        param.requires_grad = False
    for layer in list(layers)[len(layers) - n :]:
        for param in layer.parameters():
            param.requires_grad = True
    wanted = set(cfg.freeze.modules)
    for name, param in model.named_parameters():
        if wanted & set(name.split(".")):
            param.requires_grad = True
    return {"trainable_layers": n, "modules": cfg.freeze.modules}


def peft_config_for(method: str, cfg: TrainConfig, model, model_dir: Path):
    from peft import (
        IA3Config,
        LoraConfig,
        PrefixTuningConfig,
        PromptEncoderConfig,
        PromptTuningConfig,
        PromptTuningInit,
        TaskType,
    )

    task = TaskType.CAUSAL_LM
    if method in ("lora", "dora", "qlora"):
        check_target_modules(model, cfg.lora.target_modules, "train.lora.target_modules")
        return LoraConfig(
            task_type=task,
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=cfg.lora.target_modules,
            use_dora=method == "dora",
        )
    if method == "ia3":
        check_target_modules(model, cfg.ia3.target_modules, "train.ia3.target_modules")
        if cfg.ia3.target_modules is None:
            return IA3Config(task_type=task)
        return IA3Config(
            task_type=task,
            target_modules=cfg.ia3.target_modules,
            feedforward_modules=cfg.ia3.feedforward_modules or [],
        )
    p = cfg.prompt_learning
    if method == "prefix":
        return PrefixTuningConfig(task_type=task, num_virtual_tokens=p.num_virtual_tokens)
    if method == "prompt":
        if p.init_text:
            return PromptTuningConfig(
                task_type=task,
                num_virtual_tokens=p.num_virtual_tokens,
                prompt_tuning_init=PromptTuningInit.TEXT,
                prompt_tuning_init_text=p.init_text,
                tokenizer_name_or_path=str(model_dir),
            )
        return PromptTuningConfig(task_type=task, num_virtual_tokens=p.num_virtual_tokens)
    if method == "ptuning":
        return PromptEncoderConfig(
            task_type=task, num_virtual_tokens=p.num_virtual_tokens, encoder_hidden_size=p.encoder_hidden_size
        )
    raise ValueError(f"no peft config for method {method}")


def load_base_model(model_dir: Path, method: str, dtype: str):
    from transformers import AutoModelForCausalLM

    from domaintune.model.loader import torch_dtype

    kwargs: dict[str, Any] = {}
    if method == "qlora":
        import torch
        from transformers import BitsAndBytesConfig

        from domaintune.train.config import require_cuda_for_qlora

        try:
            require_cuda_for_qlora()
        except ValueError as exc:
            raise UserError(str(exc)) from None
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(dtype), **kwargs)
    model.config.use_cache = False  # training: no KV cache (also lets packed position_ids build block masks)
    return model


def build_trainable(method: str, cfg: TrainConfig, model_dir: Path, init_adapter: Path | None, dtype: str):
    """Returns (model, info) where model is a PeftModel for adapter methods, else the plain model.

    The speed levers are not switched on here: `domaintune.train.speed.apply` does that on the returned model.
    """
    model = load_base_model(model_dir, method, dtype)
    info: dict = {"method": method}
    if init_adapter is not None:
        model = _continue_adapter(model, method, cfg, model_dir, init_adapter, info)
    elif method == "freeze":
        info["freeze"] = apply_freeze(model, cfg)
    elif method != "full":
        from peft import get_peft_model

        model = _prepare_for_kbit(model, method, cfg)
        model = get_peft_model(model, peft_config_for(method, cfg, model, model_dir))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    info.update({"trainable_params": trainable, "total_params": total})
    if trainable == 0:
        raise UserError(f"method {method}: no trainable parameters")
    return model, info


def _prepare_for_kbit(model, method: str, cfg: TrainConfig):
    if method != "qlora":
        return model
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)


def _continue_adapter(model, method: str, cfg: TrainConfig, model_dir: Path, init_adapter: Path, info: dict):
    """Load an existing adapter (train.init_from) as the trainable one."""
    if method in FULL_MODEL_METHODS:
        raise UserError("train.init_from: an adapter folder cannot seed method full/freeze; use an adapter method")
    from peft import PeftModel

    model = PeftModel.from_pretrained(_prepare_for_kbit(model, method, cfg), init_adapter, is_trainable=True)
    # Point the live config at the local base folder (checkpoint saves then never look up a hub id).
    for adapter_cfg in model.peft_config.values():
        adapter_cfg.base_model_name_or_path = str(model_dir)
    peft_type = json.loads((init_adapter / "adapter_config.json").read_text()).get("peft_type")
    info["init_from_adapter"] = str(init_adapter)
    info["adapter_type"] = peft_type
    log.info("continuing adapter %s (%s)", init_adapter, peft_type)
    return model
