"""Background `domaintune run` jobs that outlive the browser and the studio.

Each job is a `domaintune run` subprocess in its own session (process group), started through
`sh -c '...; echo $? > <id>.rc'` so its exit status lands on disk even when the studio is gone.
Its files live in `<run folder>/studio/jobs/`: `<id>.json` (command, pid, times), `<id>.log`
(stdout + stderr) and `<id>.rc`. A restarted studio finds its jobs there.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from domaintune.errors import UserError
from domaintune.layout import RunLayout

STAGE_NAMES = ("data", "train", "eval", "export", "register")
_STEP = re.compile(
    r"step (?P<step>\d+)/(?P<max>\d+) loss (?P<loss>[-\d.naN]+) val (?P<val>[-\d.naN]+) (?P<tps>[\d.]+) tok/s"
)


def jobs_dir(layout: RunLayout) -> Path:
    return layout.root / "studio" / "jobs"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is finished
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def start_job(
    config: Path,
    layout: RunLayout,
    stages: list[str] | None = None,
    from_stage: str | None = None,
    extra: list[str] | None = None,
    user: str = "",
) -> dict[str, Any]:
    if running_job(layout) is not None:
        raise UserError("a job is already running for this project; stop it first")
    for stage in [*(stages or []), *([from_stage] if from_stage else [])]:
        if stage not in STAGE_NAMES:
            raise UserError(f"unknown stage {stage!r}")
    folder = jobs_dir(layout)
    folder.mkdir(parents=True, exist_ok=True)
    job_id = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid() % 1000:03d}{int(time.time() * 1000) % 1000:03d}"
    args = [sys.executable, "-m", "domaintune", "run", str(config)]
    if stages:
        args += ["--stages", ",".join(stages)]
    if from_stage:
        args += ["--from", from_stage]
    args += extra or []
    rc_file, log_file = folder / f"{job_id}.rc", folder / f"{job_id}.log"
    script = f"{shlex.join(args)}; echo $? > {shlex.quote(str(rc_file))}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "120"}
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(
            ["sh", "-c", script],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=config.parent,
            env=env,
            start_new_session=True,
        )
    job = {"id": job_id, "pid": proc.pid, "args": args[3:], "started": time.time(), "user": user}
    (folder / f"{job_id}.json").write_text(json.dumps(job), encoding="utf-8")
    return job


def _status(folder: Path, job: dict[str, Any]) -> dict[str, Any]:
    rc_file = folder / f"{job['id']}.rc"
    if rc_file.is_file():
        text = rc_file.read_text().strip()
        job["rc"] = int(text) if text.lstrip("-").isdigit() else None
        job["state"] = "succeeded" if job["rc"] == 0 else "failed"
    elif job.get("stopped"):
        job["state"] = "stopped"
    elif _alive(job["pid"]):
        job["state"] = "running"
    else:
        job["state"] = "lost"
    return job


def list_jobs(layout: RunLayout) -> list[dict[str, Any]]:
    folder = jobs_dir(layout)
    if not folder.is_dir():
        return []
    jobs = []
    for path in sorted(folder.glob("*.json"), reverse=True):
        try:
            jobs.append(_status(folder, json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError, KeyError):
            continue
    return jobs


def running_job(layout: RunLayout) -> dict[str, Any] | None:
    return next((j for j in list_jobs(layout) if j["state"] == "running"), None)


def stop_job(layout: RunLayout, job_id: str) -> dict[str, Any]:
    folder = jobs_dir(layout)
    path = folder / f"{Path(job_id).name}.json"
    if not path.is_file():
        raise UserError(f"job {job_id!r} not found")
    job = _status(folder, json.loads(path.read_text(encoding="utf-8")))
    if job["state"] != "running":
        return job
    with contextlib.suppress(ProcessLookupError):
        os.killpg(job["pid"], signal.SIGTERM)
    job["stopped"] = True
    job.pop("state", None)
    path.write_text(json.dumps(job), encoding="utf-8")
    return _status(folder, job)


def read_log(layout: RunLayout, job_id: str, tail_bytes: int = 20_000) -> str:
    path = jobs_dir(layout) / f"{Path(job_id).name}.log"
    if not path.is_file():
        return ""
    with open(path, "rb") as handle:
        handle.seek(max(0, path.stat().st_size - tail_bytes))
        text = handle.read().decode("utf-8", "replace")
    return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text).replace("\r", "\n")


def _num(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value == value else None


def live_metrics(layout: RunLayout, job_id: str | None) -> dict[str, list[list[float]]]:
    """Series [step, value] for loss, val_loss and tokens/s from the job's log, learning rate from TensorBoard."""
    series: dict[str, list[list[float]]] = {"loss": [], "val_loss": [], "tokens_per_s": [], "learning_rate": []}
    if job_id:
        for match in _STEP.finditer(read_log(layout, job_id, tail_bytes=2_000_000)):
            step = float(match["step"])
            for key, group in (("loss", "loss"), ("val_loss", "val"), ("tokens_per_s", "tps")):
                value = _num(match[group])
                if value is not None and (not series[key] or series[key][-1] != [step, value]):
                    series[key].append([step, value])
    series["learning_rate"] = _tensorboard_scalar(layout.train_dir / "tensorboard", "train/learning_rate")
    return series


def _tensorboard_scalar(folder: Path, tag: str) -> list[list[float]]:
    if not folder.is_dir():
        return []
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:  # pragma: no cover - tensorboard is a dependency
        return []
    points: dict[int, float] = {}
    for events in sorted(folder.rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags().get("scalars", []):
            points.update({e.step: e.value for e in acc.Scalars(tag)})
    return [[float(s), float(v)] for s, v in sorted(points.items())]
