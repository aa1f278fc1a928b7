"""No LoRA input cast under autocast.

peft casts each LoRA layer's input to the adapter weights' dtype (fp32) and autocast casts it straight back to
bf16 for the matmul: one full activation copy per adapted module and a dropout over twice the bytes, for the
same result. Training with precision bf16/fp16 runs under autocast (Trainer bf16/fp16), so the cast is skipped
(peft's own switch, `cast_input_dtype_enabled`, as in `peft.helpers.disable_input_dtype_casting`).
"""

from __future__ import annotations


def skip_lora_input_cast(model) -> int:
    """Let the LoRA layers of `model` take their half-precision input as it is; returns how many were changed."""
    from peft.tuners.lora import LoraLayer

    n = 0
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.cast_input_dtype_enabled = False
            n += 1
    return n
