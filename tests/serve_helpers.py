"""Shared helpers of the serve tests: tiny LoRA adapters and a project config for the tiny model."""

from __future__ import annotations

import contextlib
from pathlib import Path


def make_tiny_adapter(base_dir: Path, out_dir: Path, seed: int) -> Path:
    """A LoRA adapter on the tiny model with random (non-zero) weights, so it changes the outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(out_dir)
    return out_dir


def serve_config(output_dir: Path, serve: dict | None = None, **extra):
    from domaintune.config import config_from_dict

    section = {
        "max_context_tokens": 256,
        "default_max_tokens": 16,
        "max_tokens_cap": 64,
        "key_hash_iterations": 1000,
        "batch_wait_ms": 20,
        "max_body_bytes": 20_000,
        # these tests are about the server, on the default engine's batching; llama.cpp has its own tests
        "engine": "transformers",
    }
    section.update(serve or {})
    data = {
        "name": "tiny",
        "output_dir": str(output_dir),
        "model": {"name_or_path": "tiny-random-llama"},
        "serve": section,
    }
    data.update(extra)
    return config_from_dict(data)


# ---- real Redis and PostgreSQL servers on loopback (Debian's redis-server and postgresql) ----------
@contextlib.contextmanager
def scripted_server(cfg, scripts: dict[int, list[int]]):
    """A real server on loopback whose transformers engine writes `scripts[seed]` token by token for a request
    with that seed (the tiny models' own answers are random), yielding it with a user key as `.key`."""
    import domaintune.serve.engines.transformers as engine_module
    from domaintune.serve.server import BackgroundServer
    from domaintune.serve.state import build_state

    real_sample = engine_module._sample

    def scripted(logits, row):
        script = scripts.get(row.request.params.seed)
        return real_sample(logits, row) if script is None else script[len(row.text.ids)]

    engine_module._sample = scripted
    try:
        state = build_state(cfg)
        with BackgroundServer(state) as srv:
            srv.key = state.store.create_key("alice")[1]
            yield srv
    finally:
        engine_module._sample = real_sample


def _wait_for(check, what: str, seconds: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not start within {seconds:g} s")


def start_redis(folder: Path):
    """A throwaway redis-server on 127.0.0.1:<free port>; returns (url, process). Skips when not installed."""
    import shutil
    import subprocess

    import pytest

    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    redis = pytest.importorskip("redis", reason="the redis package is not installed (pip install redis)")
    from domaintune.serve.server import free_port

    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(folder)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    _wait_for(lambda: redis.Redis.from_url(url).ping(), "redis-server")
    return url, proc


def _pg_bin(name: str) -> str | None:
    import shutil

    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(candidates[-1]) if candidates else None


def start_postgres(folder: Path, databases: tuple[str, ...] = ("serve",)):
    """A throwaway PostgreSQL cluster on 127.0.0.1:<free port> with `databases`; returns (url of each, stop()).

    As root (CI), the cluster runs as the `postgres` user, which initdb requires. Skips when not installed.
    """
    import os
    import subprocess

    import pytest

    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'psycopg[binary]')")
    from domaintune.serve.server import free_port

    data = folder / "pgdata"
    folder.mkdir(parents=True, exist_ok=True)
    prefix: list[str] = []
    if os.geteuid() == 0:
        import pwd
        import shutil

        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user to run PostgreSQL as")
        runuser = shutil.which("runuser")
        if runuser is None:
            pytest.skip("running as root without runuser to start PostgreSQL as the postgres user")
        os.chown(folder, user.pw_uid, user.pw_gid)
        folder.chmod(0o755)
        for parent in folder.parents:  # the postgres user must be able to reach the folder
            if parent.exists() and parent.stat().st_mode & 0o001 == 0 and str(parent).startswith("/tmp"):
                parent.chmod(parent.stat().st_mode | 0o001)
        prefix = [runuser, "-u", "postgres", "--"]
    port = free_port()
    run = lambda args: subprocess.run(prefix + args, check=True, capture_output=True, text=True)  # noqa: E731
    run([initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-instructions"])
    options = f"-p {port} -h 127.0.0.1 -k {folder} -c fsync=off -c full_page_writes=off"
    run([pg_ctl, "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "-t", "60", "start"])
    admin = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        for name in databases:
            conn.execute(f'CREATE DATABASE "{name}"')

    def stop() -> None:
        subprocess.run(prefix + [pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"], capture_output=True)

    urls = {name: f"postgresql+psycopg://postgres@127.0.0.1:{port}/{name}" for name in databases}
    return urls, stop
