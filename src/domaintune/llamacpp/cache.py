"""GGUF files built once per model folder and kept in a cache, for engines that start from Hugging Face folders.

A folder (base model, merged model, or base + LoRA adapter merged here) is keyed by the names, sizes and
modification times of its files, so a retrained adapter gets a new GGUF and an unchanged one is reused.

Every retrained adapter (and every test run) gets new folders, so the cache is capped: after a folder is
written, the least recently used folders are deleted until the cache is under DOMAINTUNE_GGUF_CACHE_MAX_GB.
A folder is "used" when it is built or returned (its mtime is touched); the folder just built, the folders
returned in this process and any folder used or written in the last few minutes (another process may be
reading or building it) are never deleted. A folder is deleted by renaming it out of the way first (one
atomic rename), so a reader in another process sees the whole folder or none of it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

from domaintune.errors import UserError
from domaintune.utils.io import atomic_dir

log = logging.getLogger("domaintune.llamacpp")

CACHE_DIR_ENV = "DOMAINTUNE_GGUF_CACHE"
CACHE_MAX_ENV = "DOMAINTUNE_GGUF_CACHE_MAX_GB"
# 5 GB: one adapter of the bundled 135M model costs ~0.9 GB here (merged folder + f16 + q8_0 GGUFs), so the
# cap keeps the base model and the last few adapters warm, or one ~1.5B model's f16 + q8_0 pair, while a day
# of retraining (17 GB, 444 folders seen on a dev machine) can no longer fill the disk.
DEFAULT_CACHE_MAX_GB = 5.0
RECENT_S = 600.0  # a folder used or written this recently may be in use by another process: never evicted
_ENTRY_PREFIXES = ("merged-", "model-")
_EVICTING = ".evicting-"
_IN_USE: set[Path] = set()  # folders built or returned in this process


def gguf_cache_root() -> Path:
    own = os.environ.get(CACHE_DIR_ENV)
    if own:
        return Path(own)
    env = os.environ.get("DOMAINTUNE_CACHE")
    base = Path(env).parent if env else Path.home() / ".cache" / "domaintune"
    return base / "gguf"


def folder_key(*folders: Path) -> str:
    digest = hashlib.sha256()
    for folder in folders:
        folder = Path(folder).resolve()
        digest.update(str(folder).encode())
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            stat = path.stat()
            digest.update(f"{path.relative_to(folder)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def merged_adapter(adapter_dir: Path, base_dir: Path, root: Path | None = None) -> Path:
    """The adapter merged into its base, as a plain Hugging Face folder (built once)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from domaintune.model.spm_vocab import carry_tokenizer_model

    target = (root or gguf_cache_root()) / f"merged-{folder_key(adapter_dir, base_dir)}"
    if _touch(target) and (target / "config.json").is_file():
        return target
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    tokenizer_source = adapter_dir if (Path(adapter_dir) / "tokenizer_config.json").is_file() else base_dir
    with atomic_dir(target, if_exists="keep") as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
        tokenizer.save_pretrained(staging)
        carry_tokenizer_model(staging, tokenizer, [Path(adapter_dir), Path(base_dir)])
    _touch(target)
    evict_lru(target.parent, keep=target)
    return target


def gguf_for(hf_dir: Path, qtype: str = "q8_0", root: Path | None = None) -> Path:
    """A GGUF of `hf_dir` in `qtype` (converted to f16 by llama.cpp's converter, then quantised)."""
    from domaintune.llamacpp.quantize import check_gguf_type, quantize
    from domaintune.llamacpp.tools import convert_hf

    check_gguf_type(qtype)
    folder = (root or gguf_cache_root()) / f"model-{folder_key(hf_dir)}"
    target = folder / f"model-{qtype}.gguf"
    if _touch(folder) and target.is_file():
        return target
    f16 = folder / "model-f16.gguf"
    if not f16.is_file():
        log.info("converting %s to GGUF (once) in %s", hf_dir, folder)
        convert_hf(hf_dir, f16, "f16")
        (folder / "SOURCE.json").write_text(json.dumps({"source": str(Path(hf_dir).resolve())}), encoding="utf-8")
    if qtype != "f16":
        quantize(f16, target, qtype)
    _touch(folder)
    evict_lru(folder.parent, keep=folder)
    return target


def _touch(folder: Path) -> bool:
    """Mark `folder` used (its mtime, and in use by this process); False when it does not exist."""
    _IN_USE.add(Path(folder).resolve())
    try:
        os.utime(folder)
    except FileNotFoundError:
        return False
    return True


def cache_max_bytes() -> int:
    """The cache's cap from DOMAINTUNE_GGUF_CACHE_MAX_GB (GB, 10**9 bytes), default 5."""
    raw = os.environ.get(CACHE_MAX_ENV, "").strip()
    if not raw:
        return int(DEFAULT_CACHE_MAX_GB * 1e9)
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise UserError(f"{CACHE_MAX_ENV} must be a number of GB above 0 (e.g. 5 or 0.5), not {raw!r}")
    return int(value * 1e9)


def folder_usage(folder: Path) -> tuple[int, float]:
    """(bytes, last use) of a cache folder: last use is the newest mtime of the folder or anything in it, so a
    file still being written counts as use. A folder or file deleted meanwhile by another process counts 0."""
    total, newest = 0, 0.0
    try:
        newest = folder.stat().st_mtime
        paths = list(folder.rglob("*"))
    except FileNotFoundError:
        return 0, newest
    for path in paths:
        try:
            stat = path.lstat()
        except FileNotFoundError:
            continue
        newest = max(newest, stat.st_mtime)
        if path.is_file():
            total += stat.st_size
    return total, newest


def cache_entries(root: Path) -> list[tuple[Path, int, float]]:
    """The cache's folders as (path, bytes, last use), least recently used first."""
    try:
        names = [p for p in Path(root).iterdir() if p.name.startswith(_ENTRY_PREFIXES) and p.is_dir()]
    except FileNotFoundError:
        return []
    entries = [(path, *folder_usage(path)) for path in names]
    return sorted(entries, key=lambda entry: entry[2])


def evict_lru(root: Path, keep: Path | None = None, max_bytes: int | None = None) -> tuple[int, int]:
    """Delete least recently used folders of `root` until it holds at most `max_bytes` (default: the cap).

    Never deletes `keep`, a folder used in this process, or one used in the last RECENT_S seconds.
    Returns (folders deleted, bytes freed); safe while other processes read, build or evict in `root`.
    """
    cap = cache_max_bytes() if max_bytes is None else max_bytes
    _drop_leftovers(Path(root))
    entries = cache_entries(root)
    total = sum(size for _, size, _ in entries)
    protected = set(_IN_USE) | ({Path(keep).resolve()} if keep is not None else set())
    recent = time.time() - RECENT_S
    evicted = freed = 0
    for path, size, last_used in entries:
        if total <= cap:
            break
        if path.resolve() in protected or last_used > recent:
            continue
        doomed = path.with_name(f"{_EVICTING}{path.name}-{os.getpid()}-{time.time_ns()}")
        try:
            os.rename(path, doomed)  # atomic: readers elsewhere see the whole folder or none of it
        except FileNotFoundError:  # another process evicted it first
            total -= size
            continue
        shutil.rmtree(doomed, ignore_errors=True)
        total -= size
        evicted += 1
        freed += size
    if evicted:
        log.info(
            "GGUF cache %s: evicted %d least recently used folder(s), %.2f GB freed; %.2f GB left (cap %.2f GB, %s)",
            root,
            evicted,
            freed / 1e9,
            total / 1e9,
            cap / 1e9,
            CACHE_MAX_ENV,
        )
    return evicted, freed


def _drop_leftovers(root: Path) -> None:
    """Folders renamed for deletion by a process that died before deleting them."""
    try:
        leftovers = [p for p in root.iterdir() if p.name.startswith(_EVICTING)]
    except FileNotFoundError:
        return
    for path in leftovers:
        try:
            if time.time() - path.stat().st_mtime > RECENT_S:
                shutil.rmtree(path, ignore_errors=True)
        except FileNotFoundError:
            continue
