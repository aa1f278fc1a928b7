"""Build the trainable model for each `train.method` with peft (adapters) or plain parameter freezing."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from domaintune.errors import UserError
from domaintune.train.config import TrainConfig

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
        kwargs = {}
        if cfg.ia3.target_modules is not None:
            kwargs["target_modules"] = cfg.ia3.target_modules
            kwargs["feedforward_modules"] = cfg.ia3.feedforward_modules or []
        return IA3Config(task_type=task, **kwargs)
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

    kwargs = {}
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


# Architectures whose attention modules call the attention interface as Llama does (no soft-capping, sinks
# or other extras), so `cpu_attention` computes exactly what their eager attention does.
_CPU_ATTENTION_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def select_attention(model, choice: str) -> str:
    """Set the model's attention implementation for training; returns the one in use."""
    import torch

    if choice == "auto":
        config = model.config
        if (
            not torch.cuda.is_available()
            and config.model_type in _CPU_ATTENTION_MODEL_TYPES
            and not getattr(config, "attention_dropout", 0.0)
        ):
            choice = "domaintune_cpu"
        else:
            return config._attn_implementation
    if choice == "domaintune_cpu":
        from domaintune.train.speed.cpu_attention import register

        register()
        if getattr(model.config, "attention_dropout", 0.0):
            raise UserError(
                f"train.attention: domaintune_cpu has no attention dropout; the model sets "
                f"attention_dropout={model.config.attention_dropout} (use sdpa or eager)"
            )
    model.set_attn_implementation(choice)
    return choice


def build_trainable(method: str, cfg: TrainConfig, model_dir: Path, init_adapter: Path | None, dtype: str):
    """Returns (model, info) where model is a PeftModel for adapter methods, else the plain model."""
    model = load_base_model(model_dir, method, dtype)
    info: dict = {"method": method, "attention": select_attention(model, cfg.attention)}
    if init_adapter is not None:
        if method in ("full", "freeze"):
            raise UserError("train.init_from: an adapter folder cannot seed method full/freeze; use an adapter method")
        from peft import PeftModel

        if method == "qlora":
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
        model = PeftModel.from_pretrained(model, init_adapter, is_trainable=True)
        # Point the live config at the local base folder (checkpoint saves then never look up a hub id).
        for adapter_cfg in model.peft_config.values():
            adapter_cfg.base_model_name_or_path = str(model_dir)
        peft_type = json.loads((init_adapter / "adapter_config.json").read_text()).get("peft_type")
        info["init_from_adapter"] = str(init_adapter)
        info["adapter_type"] = peft_type
        log.info("continuing adapter %s (%s)", init_adapter, peft_type)
    elif method == "full":
        pass
    elif method == "freeze":
        info["freeze"] = apply_freeze(model, cfg)
    else:
        from peft import get_peft_model

        if method == "qlora":
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
        model = get_peft_model(model, peft_config_for(method, cfg, model, model_dir))
    if method == "lora" and cfg.precision != "fp32":
        info["lora_input_cast"] = skip_lora_input_cast(model)
    if method in ("lora", "dora", "qlora") and cfg.lora.cheap_mask_dropout:
        from domaintune.train.speed.fast_dropout import use_cheap_mask_dropout

        info["cheap_mask_dropout"] = use_cheap_mask_dropout(model)
    if method == "lora" and cfg.lora.fused_linear:
        from domaintune.train.speed.fused_lora import use_fused_lora_linear

        info["fused_lora_linear"] = use_fused_lora_linear(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    info.update({"trainable_params": trainable, "total_params": total})
    if trainable == 0:
        raise UserError(f"method {method}: no trainable parameters")
    return model, info


def skip_lora_input_cast(model) -> int:
    """Under bf16/fp16 autocast, let LoRA layers take their half-precision input as it is.

    peft casts each LoRA layer's input to the adapter weights' dtype (fp32) and autocast casts it straight
    back to bf16 for the matmul: one full activation copy per adapted module and a dropout over twice the
    bytes, for the same result. Training runs under autocast (Trainer bf16/fp16), so the cast is skipped
    (peft's own switch, `cast_input_dtype_enabled`, as in `peft.helpers.disable_input_dtype_casting`).
    Returns the number of layers changed.
    """
    from peft.tuners.lora import LoraLayer

    n = 0
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.cast_input_dtype_enabled = False
            n += 1
    return n
