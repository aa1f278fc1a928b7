"""Load test of `domaintune serve`: 32 concurrent clients x N requests against the bundled model.

Baseline, measured in the same run on the same machine: a plain transformers `generate` loop that
serves the same requests one by one (all of them arriving at once, so a request's latency is the
time until the loop reaches and finishes it). Both sides decode greedily with the same max_tokens
and stop at the end-of-turn token, so they do the same work.

    nice -n 10 python bench/bench_serve.py --clients 32 --requests-per-client 2 --max-tokens 32 [--engine llamacpp]

`--compare-engine transformers` also load-tests the server with its transformers engine (what it served with
before llama.cpp) in the same run, a second baseline; the first engine's ratios are printed against each.

Mixed workload (--mixed): a `domaintune serve` process on loopback, 64 concurrent clients for a
bounded time, 10% of them hostile (degenerate sampling, lone surrogates, deeply nested JSON, empty
prompts, bad model names, wrong secrets, oversized chunked bodies and prompts, huge feedback). It
reports p50/p95/p99 of the well-formed requests, every answer by class, the well-formed requests
that failed (must be 0; the exit status says so) and the server's memory before and after.

    nice -n 10 python bench/bench_serve.py --mixed --clients 64 --hostile-share 0.1 --duration 180
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "general_seed_tasks" / "seed_tasks.jsonl"
FALLBACK_PROMPTS = [
    "What are common symptoms of the flu?",
    "How much water should an adult drink per day?",
    "Explain what blood pressure numbers mean.",
    "Give three tips for better sleep.",
    "What is the difference between a virus and a bacterium?",
    "How does exercise help the heart?",
    "Why is it important to finish a course of antibiotics?",
    "What should I do for a mild burn?",
]


def load_prompts(n: int) -> list[str]:
    prompts: list[str] = []
    if SHARED.is_file():
        for line in SHARED.read_text(encoding="utf-8").splitlines():
            task = json.loads(line)
            text = task.get("instruction", "")
            inst = (task.get("instances") or [{}])[0].get("input", "")
            prompts.append(f"{text}\n\n{inst}".strip() if inst else text)
    else:
        print(f"note: {SHARED} not found; using {len(FALLBACK_PROMPTS)} built-in prompts", file=sys.stderr)
        prompts = FALLBACK_PROMPTS
    return [prompts[i % len(prompts)] for i in range(n)]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def run_server_load(cfg, prompts: list[str], clients: int, max_tokens: int) -> dict:
    from openai import AsyncOpenAI
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from domaintune.serve.server import BackgroundServer
    from domaintune.serve.state import build_state

    state = build_state(cfg)
    key = state.store.create_key("bench")[1]
    latencies: list[float] = []
    errors: list[str] = []
    completion_tokens = 0
    outputs: dict[int, str] = {}
    with BackgroundServer(state) as server:

        async def main():
            nonlocal completion_tokens
            client = AsyncOpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=600)
            model = state.catalog.base_name
            # Warm-up (first batch pays one-off costs).
            await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
            )
            queue: asyncio.Queue[int] = asyncio.Queue()
            for i in range(len(prompts)):
                queue.put_nowait(i)
            with Progress(
                TextColumn("server"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                transient=True,
            ) as progress:
                task = progress.add_task("requests", total=len(prompts))

                async def worker():
                    nonlocal completion_tokens
                    while not queue.empty():
                        i = queue.get_nowait()
                        start = time.perf_counter()
                        try:
                            r = await client.chat.completions.create(
                                model=model,
                                messages=[{"role": "user", "content": prompts[i]}],
                                max_tokens=max_tokens,
                                temperature=0,
                            )
                            latencies.append(time.perf_counter() - start)
                            completion_tokens += r.usage.completion_tokens
                            outputs[i] = r.choices[0].message.content
                        except Exception as exc:  # counted and reported, never hidden
                            errors.append(f"{type(exc).__name__}: {exc}")
                        progress.advance(task)

                t0 = time.perf_counter()
                await asyncio.gather(*[worker() for _ in range(clients)])
                wall = time.perf_counter() - t0
            await client.close()
            return wall

        wall = asyncio.run(main())
        batches = state.engine.batches_run
    return {
        "wall_s": wall,
        "latencies": latencies,
        "errors": errors,
        "completion_tokens": completion_tokens,
        "outputs": outputs,
        "batches": batches,
    }


def run_baseline(model_dir: Path, prompts: list[str], max_tokens: int) -> dict:
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from domaintune.model.loader import end_of_turn_token_ids

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eot = end_of_turn_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot[0]

    def generate(prompt: str, n: int):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=n, do_sample=False, eos_token_id=eot, pad_token_id=pad)
        new = out[0, ids["input_ids"].shape[1] :].tolist()
        while new and new[-1] in eot + [pad]:
            new.pop()
        return tokenizer.decode(new, skip_special_tokens=True), len(new)

    generate("hi", 4)  # warm-up
    latencies, outputs, completion_tokens = [], {}, 0
    t0 = time.perf_counter()
    for i, prompt in enumerate(tqdm(prompts, desc="baseline (one by one)", unit="req")):
        text, n = generate(prompt, max_tokens)
        latencies.append(time.perf_counter() - t0)  # all requests arrived at t0
        outputs[i] = text
        completion_tokens += n
    wall = time.perf_counter() - t0
    return {
        "wall_s": wall,
        "latencies": latencies,
        "errors": [],
        "completion_tokens": completion_tokens,
        "outputs": outputs,
    }


def _server_config(tmp: Path, model: str, engine: str, max_batch_size: int, max_tokens: int):
    from domaintune.config import config_from_dict

    return config_from_dict(
        {
            "name": "bench",
            "output_dir": str(tmp / engine),
            "model": {"name_or_path": model},
            "serve": {
                "max_batch_size": max_batch_size,
                "batch_wait_ms": 20,
                "max_tokens_cap": max_tokens,
                "default_max_tokens": max_tokens,
                "key_hash_iterations": 1000,
                "serve_trained": False,
                "engine": engine,
                "request_timeout_s": 3600,
            },
        }
    )


def _row(name: str, r: dict) -> dict:
    lat = r["latencies"]
    return {
        "name": name,
        "requests_ok": len(lat),
        "errors": len(r["errors"]),
        "wall_s": round(r["wall_s"], 2),
        "req_per_s": round(len(lat) / r["wall_s"], 3),
        "tok_per_s": round(r["completion_tokens"] / r["wall_s"], 1),
        "p50_s": round(pct(lat, 0.5), 2),
        "p95_s": round(pct(lat, 0.95), 2),
        "p99_s": round(pct(lat, 0.99), 2),
        "completion_tokens": r["completion_tokens"],
    }


def _print_results(rows: list[dict], runs: list[dict], n: int, max_tokens: int, threads: int) -> None:
    """The table, then the first row's ratios against every other row (each a baseline of this run)."""
    from rich.console import Console
    from rich.table import Table

    columns = ("name", "requests_ok", "errors", "wall_s", "req_per_s", "tok_per_s", "p50_s", "p95_s", "p99_s")
    table = Table(title=f"bench_serve: {n} requests, max_tokens {max_tokens}")
    for col in columns:
        table.add_column(col)
    for r in rows:
        table.add_row(*[str(r[c]) for c in columns])
    console = Console(width=160)
    console.print(table)
    first = rows[0]
    for other, run in zip(rows[1:], runs[1:]):
        same = sum(runs[0]["outputs"].get(i) == run["outputs"].get(i) for i in range(n))
        console.print(
            f"{first['name']} / {other['name']}: {first['req_per_s'] / other['req_per_s']:.2f}x requests/s, "
            f"{first['tok_per_s'] / other['tok_per_s']:.2f}x tokens/s, p50 {first['p50_s'] / other['p50_s']:.2f}x, "
            f"p95 {first['p95_s'] / other['p95_s']:.2f}x (latencies: lower is better); greedy outputs identical: "
            f"{same}/{n}"
        )
    console.print(
        "server batches: "
        + ", ".join(f"{r['name']}: {run['batches']}" for r, run in zip(rows, runs) if "batches" in run)
    )
    console.print(
        f"load average (1 min) at the end {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; torch threads {threads}"
    )
    for r, run in zip(rows, runs):
        if run["errors"]:
            console.print(f"[red]errors ({r['name']}):[/] {run['errors'][:5]}")


def main() -> None:
    if "--mixed" in sys.argv:
        sys.argv.remove("--mixed")
        raise SystemExit(mixed_main())
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument(
        "--engine",
        choices=["transformers", "llamacpp"],
        default="transformers",
        help="The server's engine (llamacpp: the q8_0 GGUF of the model, what `auto` picks on a CPU).",
    )
    parser.add_argument(
        "--compare-engine",
        choices=["transformers", "llamacpp"],
        action="append",
        default=[],
        help="Also load-test the server with this engine, in the same run, as a second baseline "
        "(`--engine llamacpp --compare-engine transformers`: the server before llama.cpp against it).",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads for both sides (default: torch's choice). On a shared, "
        "busy CPU use 1: spinning OpenMP threads that lose their core slow both sides erratically.",
    )
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}, load average at start: {os.getloadavg()[0]:.2f}", file=sys.stderr)
    from domaintune.model.config import ModelConfig
    from domaintune.model.loader import resolve_model_dir

    n = args.clients * args.requests_per_client
    prompts = load_prompts(n)
    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    rows: list[dict] = []
    runs: list[dict] = []
    for engine in [args.engine, *[e for e in args.compare_engine if e != args.engine]]:
        print(
            f"{n} requests ({args.clients} clients x {args.requests_per_client}), max_tokens={args.max_tokens}, "
            f"model {args.model}, greedy, server engine {engine}",
            file=sys.stderr,
        )
        cfg = _server_config(tmp, args.model, engine, args.max_batch_size, args.max_tokens)
        run = run_server_load(cfg, prompts, args.clients, args.max_tokens)
        run["load_after"] = os.getloadavg()[0]
        print(
            f"server ({engine}): {len(run['latencies'])} ok, {len(run['errors'])} errors in {run['wall_s']:.1f} s "
            f"(load average {run['load_after']:.2f})",
            file=sys.stderr,
        )
        rows.append(_row(f"domaintune serve, {engine} ({args.clients} clients, batched)", run))
        runs.append(run)
    baseline = run_baseline(resolve_model_dir(ModelConfig(name_or_path=args.model)), prompts, args.max_tokens)
    baseline["load_after"] = os.getloadavg()[0]
    print(
        f"baseline: {len(baseline['latencies'])} in {baseline['wall_s']:.1f} s (load average "
        f"{baseline['load_after']:.2f})",
        file=sys.stderr,
    )
    rows.append(_row("transformers generate, one by one", baseline))
    runs.append(baseline)
    _print_results(rows, runs, n, args.max_tokens, torch.get_num_threads())
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "rows": rows,
                    "batches": {r["name"]: run["batches"] for r, run in zip(rows, runs) if "batches" in run},
                    "errors": {r["name"]: run["errors"] for r, run in zip(rows, runs)},
                    "load_after": {r["name"]: run["load_after"] for r, run in zip(rows, runs)},
                },
                indent=2,
            )
        )


# ---- mixed workload: well-formed and hostile clients together ------------------------------------
CHAT_PATH = "/v1/chat/completions"
REQUEST_TIMEOUT_S = 300


def _hostile_requests(model: str, key: str, admin: str) -> list[tuple[str, dict]]:
    """(label, httpx request arguments) for each hostile input the server must refuse or survive."""
    auth = {"Authorization": f"Bearer {key}"}
    raw = {**auth, "content-type": "application/json"}
    key_id = key.split("-")[1]

    def chat(**extra):
        return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, **extra}

    async def chunked():
        for _ in range(2 * 16):  # 2 MB without Content-Length: over serve.max_body_bytes (1 MB)
            yield b"x" * 65536

    return [
        ("tiny temperature", {"json": chat(temperature=1e-45), "headers": auth}),
        (
            "lone surrogate",
            {
                "content": b'{"model": "%s", "messages": [{"role": "user", "content": "\\ud800"}]}' % model.encode(),
                "headers": raw,
            },
        ),
        ("nested 5000 deep", {"content": b"[" * 5000 + b"]" * 5000, "headers": raw}),
        ("NaN", {"content": b'{"model": "m", "messages": [], "temperature": NaN}', "headers": raw}),
        (
            "empty prompt",
            {"path": "/v1/completions", "json": {"model": model, "prompt": "", "max_tokens": 4}, "headers": auth},
        ),
        ("bad model name", {"json": chat(model="x/../y"), "headers": auth}),
        ("non-latin-1 name", {"json": chat(model="é中文"), "headers": auth}),
        (
            "newline in name",
            {
                "path": "/admin/models",
                "json": {"name": "a\nb", "source": "/tmp"},
                "headers": {"Authorization": f"Bearer {admin}"},
            },
        ),
        (
            "__base__",
            {
                "path": "/admin/models",
                "json": {"name": "__base__", "source": "/tmp"},
                "headers": {"Authorization": f"Bearer {admin}"},
            },
        ),
        ("wrong secret", {"json": chat(), "headers": {"Authorization": f"Bearer dt-{key_id}-{'w' * 32}"}}),
        ("unknown key id", {"json": chat(), "headers": {"Authorization": "Bearer dt-00000000-" + "w" * 32}}),
        ("chunked 2 MB body", {"content": chunked, "headers": auth}),
        (
            "oversized prompt",
            {"json": chat(messages=[{"role": "user", "content": "word " * 190_000}]), "headers": auth},
        ),
        (
            "huge feedback",
            {
                "path": "/v1/feedback",
                "json": {"request_id": "x", "rating": -1, "correction": "y" * 900_000},
                "headers": auth,
            },
        ),
    ]


def _well_formed(i: int, model: str) -> tuple[str, dict]:
    prompt = FALLBACK_PROMPTS[i % len(FALLBACK_PROMPTS)]
    kind = i % 4
    if kind == 3:
        return "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0.7, "seed": i}
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 16, "seed": i}
    return CHAT_PATH, {**body, "stream": kind == 1, "temperature": 0.0 if kind == 2 else 0.8}


async def _mixed_clients(url: str, keys: dict, model: str, clients: int, hostile: int, duration: float) -> dict:
    import httpx

    stats: dict = {"latencies": [], "classes": {}, "failed_well_formed": [], "requests": 0}
    deadline = time.monotonic() + duration
    hostile_inputs = _hostile_requests(model, keys["user"], keys["admin"])

    def count(who: str, label: str) -> None:
        stats["classes"][f"{who}: {label}"] = stats["classes"].get(f"{who}: {label}", 0) + 1

    async def well_formed(client, n: int) -> None:
        i = n
        while time.monotonic() < deadline:
            path, body = _well_formed(i, model)
            i += clients
            start = time.perf_counter()
            try:
                r = await client.post(url + path, json=body, headers={"Authorization": f"Bearer {keys['user']}"})
                ok = r.status_code == 200 and (not body.get("stream") or r.text.rstrip().endswith("data: [DONE]"))
                ok = ok and "error" not in (r.text if body.get("stream") else "")
                label = str(r.status_code)
            except httpx.HTTPError as exc:
                ok, label = False, type(exc).__name__
            stats["requests"] += 1
            count("well-formed", label)
            if ok:
                stats["latencies"].append(time.perf_counter() - start)
            else:
                stats["failed_well_formed"].append(f"{path} {label}")

    async def attacker(client, n: int) -> None:
        i = n
        while time.monotonic() < deadline:
            label, args = hostile_inputs[i % len(hostile_inputs)]
            i += 1
            args = dict(args)
            path = args.pop("path", CHAT_PATH)
            if callable(args.get("content")):
                args["content"] = args["content"]()
            try:
                r = await client.post(url + path, **args)
                outcome = f"{r.status_code} {r.json()['error']['code'] if r.status_code >= 400 else 'ok'}"
            except (httpx.HTTPError, ValueError) as exc:
                outcome = f"connection closed ({type(exc).__name__})"
            stats["requests"] += 1
            count(f"hostile {label}", outcome)

    limits = httpx.Limits(max_connections=clients + 8)
    # The clients wait longer than the server's own deadline (request_timeout_s, 300 s): a request that the
    # server could not finish in time is its 504, not a client giving up first on a slow, shared machine.
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S + 60, limits=limits) as client:
        tasks = [attacker(client, n) for n in range(hostile)]
        tasks += [well_formed(client, n) for n in range(clients - hostile)]
        await asyncio.gather(*tasks)
    return stats


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _start_mixed_server(tmp: Path, model: str) -> tuple[subprocess.Popen, str, dict]:
    """`domaintune serve` on a free loopback port with a user and an admin key; (process, url, keys)."""
    import httpx
    import yaml

    from domaintune.serve.server import free_port
    from domaintune.serve.store import Store

    serve = {
        "key_hash_iterations": 100_000,
        "max_tokens_cap": 64,
        "default_max_tokens": 32,
        "serve_trained": False,
        "engine": "transformers",
        "request_timeout_s": REQUEST_TIMEOUT_S,
        "max_context_tokens": 512,
    }
    project = tmp / "project.yaml"
    project.write_text(
        yaml.safe_dump(
            {"name": "bench", "output_dir": str(tmp / "run"), "model": {"name_or_path": model}, "serve": serve}
        )
    )
    store = Store(f"sqlite:///{tmp / 'run' / 'serve' / 'serve.db'}", key_hash_iterations=100_000)
    keys = {"user": store.create_key("bench")[1], "admin": store.create_key("ops", is_admin=True)[1]}
    store.engine.dispose()
    port = free_port()
    exe = Path(sys.executable).parent / "domaintune"
    proc = subprocess.Popen(
        [str(exe), "serve", str(project), "--port", str(port), "--log-level", "warning"],
        stdout=subprocess.DEVNULL,
        stderr=(tmp / "server.log").open("w"),
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {(tmp / 'server.log').read_text()[-2000:]}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url, keys
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit("server not ready within 300 s")


def mixed_main() -> int:
    parser = argparse.ArgumentParser(description="bench_serve --mixed: well-formed and hostile clients together")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--hostile-share", type=float, default=0.1)
    parser.add_argument("--duration", type=float, default=180.0, help="Seconds of load (bounded).")
    parser.add_argument("--model", default="tiny-random-llama")
    parser.add_argument("--max-memory-growth-mb", type=float, default=200.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import httpx

    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_mixed_"))
    (tmp / "run" / "serve").mkdir(parents=True)
    proc, url, keys = _start_mixed_server(tmp, args.model)
    try:
        model = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {keys['user']}"}).json()["data"][0][
            "id"
        ]
        for _ in range(3):  # warm-up: the first batches pay one-off costs
            httpx.post(
                url + CHAT_PATH,
                json=_well_formed(0, model)[1],
                headers={"Authorization": f"Bearer {keys['user']}"},
                timeout=120,
            )
        rss_before = _rss_mb(proc.pid)
        hostile = max(1, round(args.clients * args.hostile_share))
        t0 = time.perf_counter()
        stats = asyncio.run(_mixed_clients(url, keys, model, args.clients, hostile, args.duration))
        wall = time.perf_counter() - t0
        time.sleep(2)
        rss_after = _rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return _mixed_report(args, stats, wall, hostile, rss_before, rss_after)


def _mixed_report(args, stats: dict, wall: float, hostile: int, rss_before: float, rss_after: float) -> int:
    import platform

    lat = stats["latencies"]
    report = {
        "clients": args.clients,
        "hostile_clients": hostile,
        "duration_s": round(wall, 1),
        "requests": stats["requests"],
        "well_formed_ok": len(lat),
        "well_formed_failed": len(stats["failed_well_formed"]),
        "failed_examples": stats["failed_well_formed"][:10],
        "p50_s": round(pct(lat, 0.5), 3),
        "p95_s": round(pct(lat, 0.95), 3),
        "p99_s": round(pct(lat, 0.99), 3),
        "classes": dict(sorted(stats["classes"].items())),
        "server_rss_mb_before": round(rss_before, 1),
        "server_rss_mb_after": round(rss_after, 1),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(report, indent=2, ensure_ascii=False))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    growth_ok = rss_after - rss_before <= args.max_memory_growth_mb
    hostile_5xx = sum(n for k, n in stats["classes"].items() if k.startswith("hostile") and k.split(": ")[1][:1] == "5")
    print(
        f"well-formed failed: {report['well_formed_failed']} (must be 0); hostile 5xx: {hostile_5xx} (must be 0); "
        f"memory {rss_before:.0f} -> {rss_after:.0f} MB (bound +{args.max_memory_growth_mb:g} MB)"
    )
    return 0 if report["well_formed_failed"] == 0 and hostile_5xx == 0 and growth_ok else 1


if __name__ == "__main__":
    main()
