"""What one server process holds: config, store, engine, catalog, metrics, limits, canary, worker threads.

`build_state(cfg, output_dir)` loads the models and opens the store (slow, done once before the
server listens); the app reads everything it needs from the `ServeState` it returns. CPU work of a
request (JSON parsing, chat templates, tokenising) runs on `cpu_pool` and key hashing on
`key_pool`, never on the event loop, so health checks and streams stay responsive.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from domaintune.layout import RunLayout
from domaintune.serve.canary import CanaryController, setup_canary
from domaintune.serve.catalog import Catalog, ServedModel
from domaintune.serve.config import ServeConfig
from domaintune.serve.engines import Engine, build_engine, choose_engine
from domaintune.serve.limits import DailyUsage, Limits, MemoryLimits
from domaintune.serve.observability import Metrics
from domaintune.serve.store import Store, default_store_url
from domaintune.utils.names import default_model_name

if TYPE_CHECKING:
    from domaintune.config import ProjectConfig

log = logging.getLogger("domaintune.serve")

# The data stage's PII redactor: text -> (redacted text, counts per kind).
Redactor = Callable[[str], tuple[str, dict[str, int]]]
T = TypeVar("T")


@dataclass
class ServeState:
    scfg: ServeConfig
    store: Store
    engine: Engine
    engine_reason: str
    catalog: Catalog
    metrics: Metrics
    limits: Limits
    project_name: str
    canary: CanaryController | None = None
    canary_arms: dict[str, ServedModel] = field(default_factory=dict)
    redactor: Redactor | None = None
    started_at: float = field(default_factory=time.time)
    cpu_pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(2, "domaintune-cpu"))
    key_pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "domaintune-keys"))
    key_checks: dict[str, asyncio.Future] = field(default_factory=dict)  # key -> its hash in progress (loop only)

    async def cpu(self, fn: Callable[..., T], *args: Any) -> T:
        """Run CPU work (parsing, templates, tokenising) off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.cpu_pool, functools.partial(fn, *args))

    async def limit(self, fn: Callable[..., T], *args: Any) -> T:
        """Call the limits: directly when in memory, from a thread when they do network I/O (Redis)."""
        if self.limits.remote:
            return await asyncio.to_thread(fn, *args)
        return fn(*args)

    def close(self) -> None:
        self.engine.stop()
        self.cpu_pool.shutdown(wait=False, cancel_futures=True)
        self.key_pool.shutdown(wait=False, cancel_futures=True)
        self.limits.close()
        self.store.engine.dispose()


def open_limits(url: str | None, daily_usage: DailyUsage) -> Limits:
    """In-memory counters (one replica), or Redis ones for `redis://...` (shared by every replica)."""
    if not url:
        return MemoryLimits(daily_usage)
    from domaintune.serve.limits_redis import RedisLimits

    return RedisLimits(url, daily_usage)


def _registry_factory(cfg: ProjectConfig) -> Callable[[], Any]:
    def factory() -> Any:
        from domaintune.registry import registry_from_config  # written by the registry stage

        return registry_from_config(cfg)

    return factory


def _redactor(scfg: ServeConfig) -> Redactor | None:
    if not scfg.redact_pii:
        return None
    from domaintune.data.pii import redact_pii

    return redact_pii


def build_state(cfg: ProjectConfig, output_dir: Path | None = None, engine_name: str | None = None) -> ServeState:
    """Open the store, start the engine and load every configured model (the slow part of start-up)."""
    scfg: ServeConfig = cfg.serve
    layout = RunLayout(Path(output_dir)) if output_dir else cfg.layout
    store = Store(scfg.store_url or default_store_url(layout.root), key_hash_iterations=scfg.key_hash_iterations)
    name, reason = choose_engine(engine_name or scfg.engine)
    log.info("engine: %s (%s)", name, reason, extra={"engine": name})
    if name == "transformers":
        from domaintune.hardware.autoselect import apply_threads

        threads = apply_threads(scfg.num_threads)
        log.info("torch threads: %s (%s)", threads.value, threads.reason)
    engine = build_engine(name, scfg.dtype or cfg.model.dtype, scfg)
    metrics = Metrics()
    engine.on_batch = metrics.batch_size.observe
    catalog = Catalog(engine, registry_factory=_registry_factory(cfg))
    try:
        limits = open_limits(scfg.limits_url, store.tokens_used_on)
    except BaseException:
        engine.stop()
        raise
    state = ServeState(
        scfg,
        store,
        engine,
        reason,
        catalog,
        metrics,
        limits,
        cfg.name,
        redactor=_redactor(scfg),
        cpu_pool=ThreadPoolExecutor(scfg.cpu_workers, "domaintune-cpu"),
    )
    try:
        _load_models(state, cfg, layout)
    except BaseException:
        state.close()
        raise
    metrics.models_loaded.set(len(catalog.models))
    engine.start()
    return state


def _load_models(state: ServeState, cfg: ProjectConfig, layout: RunLayout) -> None:
    """The base model, the run's trained model, the configured extra models, then the canary's arms."""
    from domaintune.model.loader import resolve_model_dir

    scfg, catalog = state.scfg, state.catalog
    base_name = scfg.base_name or default_model_name(cfg.model.name_or_path)
    catalog.add_base(base_name, resolve_model_dir(cfg.model))
    if not scfg.serve_base:
        catalog.models[base_name].hidden = True
    trained = layout.model_dir
    listed = cfg.name in [m.name for m in scfg.models]
    is_canary = scfg.canary is not None and scfg.canary.model == cfg.name
    if scfg.serve_trained and trained.is_dir() and not listed and not is_canary:
        log.info("serving the trained model %s as %r", trained, cfg.name)
        catalog.add(cfg.name, str(trained))
    for item in scfg.models:
        catalog.add(item.name, item.source, item.parent)
    if scfg.canary:
        setup_canary(state, scfg.canary)
