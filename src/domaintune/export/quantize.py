"""Quantised exports: dynamic INT8 for CPU (torch) and bitsandbytes 4-/8-bit on a CUDA GPU.

The INT8 folder holds `config.json`, the tokenizer files, `quantization.json` and
`model_int8.pt` (the quantised state dict, loadable with `weights_only=True`).
`load_int8(folder)` rebuilds the architecture from the config, applies the same
dynamic quantisation to it and loads the saved packed weights.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from domaintune.errors import UserError
from domaintune.utils.io import atomic_dir

INT8_WEIGHTS = "model_int8.pt"
INT8_SPEC = "quantization.json"


def _quantize_dynamic(model, names: list[str]):
    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig

    with warnings.catch_warnings():
        # torch points users of torch.ao's eager quantisation at torchao; the API still works.
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(
            model, dict.fromkeys(names, per_channel_dynamic_qconfig), dtype=torch.qint8
        )


def int8_targets(model, exclude: list[str] | tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(quantised, kept in float) nn.Linear names; a name is kept when it ends with an `exclude` entry."""
    import torch

    quantised: list[str] = []
    kept: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            (kept if any(name == e or name.endswith("." + e) for e in exclude) else quantised).append(name)
    return quantised, kept


def quantize_int8(model, exclude: list[str] | tuple[str, ...] = ("lm_head",)):
    """Dynamic INT8 of the nn.Linear layers not excluded: int8 weights per output channel, activations
    quantised per batch at run time."""
    model = model.float().eval()
    names, _ = int8_targets(model, exclude)
    return _quantize_dynamic(model, names)


def save_int8(model, tokenizer, folder: str | Path, exclude: list[str] | tuple[str, ...] = ("lm_head",)) -> Path:
    """Quantise `model` (a float CausalLM) and write a self-contained INT8 folder atomically."""
    import torch

    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        names, kept = int8_targets(model, exclude)
        quantized = _quantize_dynamic(model.float().eval(), names)
        torch.save(quantized.state_dict(), tmp / INT8_WEIGHTS)
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        spec = {
            "method": "torch.ao.quantization.quantize_dynamic",
            "dtype": "qint8",
            "weight_scheme": "per-channel",
            "quantized": names,
            "kept_float": kept,
            "exclude": list(exclude),
            "weights": INT8_WEIGHTS,
            "torch": torch.__version__,
        }
        (tmp / INT8_SPEC).write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
    return folder


def load_int8(folder: str | Path):
    """Load an INT8 folder written by `save_int8`; returns (model, tokenizer). CPU only."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    if not (folder / INT8_SPEC).is_file() or not (folder / INT8_WEIGHTS).is_file():
        raise UserError(f"{folder} is not an INT8 export (needs {INT8_SPEC} and {INT8_WEIGHTS})")
    spec = json.loads((folder / INT8_SPEC).read_text(encoding="utf-8"))
    if "quantized" not in spec:
        raise UserError(
            f"{folder / INT8_SPEC} lists no quantised layers (written by an older export); re-run the export"
        )
    config = AutoConfig.from_pretrained(folder)
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers kept it in modeling_utils; the installed one does not, hence the ignore
        from transformers.modeling_utils import no_init_weights  # type: ignore[attr-defined,no-redef]
    with no_init_weights():  # every weight is overwritten by the saved state below
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = _quantize_dynamic(model.eval(), spec["quantized"])
    state = torch.load(folder / INT8_WEIGHTS, weights_only=True, map_location="cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(
            f"{folder}/{INT8_WEIGHTS} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def save_bitsandbytes(merged_dir: str | Path, folder: str | Path, bits: int) -> Path:
    """Load the merged model in 4- or 8-bit with bitsandbytes on the GPU and save it (needs CUDA)."""
    import torch

    if not torch.cuda.is_available():
        raise UserError(
            f"export.bitsandbytes: {bits}-bit bitsandbytes quantisation needs a CUDA GPU and this machine has none "
            "(torch.cuda.is_available() is False); remove it from export.bitsandbytes or run on a GPU"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("export.bitsandbytes: install the GPU extra first: pip install 'domaintune[gpu]'") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    if bits == 4:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    elif bits == 8:
        quant = BitsAndBytesConfig(load_in_8bit=True)
    else:
        raise UserError(f"export.bitsandbytes: {bits}-bit is not supported (4bit or 8bit)")
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        model = AutoModelForCausalLM.from_pretrained(merged_dir, quantization_config=quant, device_map={"": 0})
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(merged_dir).save_pretrained(tmp)
    return folder
