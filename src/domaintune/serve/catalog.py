"""What the server serves: public model names mapped to weights (backbone) and adapters, with versions.

Sources are folders (a PEFT adapter, or a full Hugging Face model such as export/merged, or a run
folder holding `model/`) or registry URIs (`registry://name@alias`), which the registry resolves
to a checked local folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from domaintune.errors import UserError
from domaintune.registry.uri import is_registry_uri, parse_registry_uri
from domaintune.serve.engines.base import Engine

log = logging.getLogger("domaintune.serve")


@dataclass
class ServedModel:
    name: str
    kind: str  # base | adapter | full
    backbone: str
    adapter: str | None
    parent: str | None
    source: str
    version: str
    path: Path
    created: int = field(default_factory=lambda: int(time.time()))
    registry_name: str | None = None  # for registry sources: the registered model name
    hidden: bool = False  # canary arms are reached through the public name

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.name,
            "object": "model",
            "created": self.created,
            "owned_by": "domaintune",
            "parent": self.parent,
            "root": self.parent or self.name,
            "kind": self.kind,
            "version": self.version,
            "source": self.source,
        }


@dataclass
class ResolvedSource:
    path: Path
    version: str
    registry_name: str | None


def _weights_folder(path: Path) -> Path:
    """The folder holding weights: the path itself, or its `model/` (a run folder) / `merged/` (export)."""
    if (path / "adapter_config.json").is_file() or (path / "config.json").is_file():
        return path
    for sub in ("model", "export/merged", "merged"):
        if (path / sub / "adapter_config.json").is_file() or (path / sub / "config.json").is_file():
            return path / sub
    raise UserError(f"{path}: no adapter_config.json or config.json here (nor in model/ or export/merged/)")


_VERSION_CACHE: dict[tuple[str, int, int], str] = {}  # (file, size, mtime) -> sha256 of its bytes


def _file_digest(item: Path) -> str:
    stat = item.stat()
    key = (str(item.resolve()), stat.st_size, stat.st_mtime_ns)
    digest = _VERSION_CACHE.get(key)
    if digest is None:
        h = hashlib.sha256()
        with item.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        digest = _VERSION_CACHE[key] = h.hexdigest()
    return digest


def local_version(path: Path) -> str:
    """A short content id for unregistered folders: sha256 over the config and weight files' contents."""
    digest = hashlib.sha256()
    for item in sorted(path.iterdir()):
        if item.is_file() and item.suffix in (".json", ".safetensors", ".bin"):
            digest.update(item.name.encode())
            digest.update(_file_digest(item).encode())
    return "local-" + digest.hexdigest()[:12]


class Catalog:
    def __init__(self, engine: Engine, registry_factory=None):
        self.engine = engine
        self._registry_factory = registry_factory
        self._registry = None
        self.models: dict[str, ServedModel] = {}
        self.base_name: str | None = None
        self._lock = threading.RLock()
        self._backbone_paths: dict[str, str] = {}  # resolved path -> backbone key
        self._adapters_added = 0  # engine adapter keys are `adapter<n>`, never the public name

    # ---- resolution -----------------------------------------------------------------------------
    def registry(self):
        if self._registry is None:
            if self._registry_factory is None:
                raise UserError("a registry:// source needs the registry (registry section of the project file)")
            self._registry = self._registry_factory()
        return self._registry

    def resolve_source(self, source: str) -> ResolvedSource:
        if is_registry_uri(source):
            uri = parse_registry_uri(source)
            registry = self.registry()
            path = Path(registry.resolve(source))
            version = uri.ref
            describe = getattr(registry, "version_of", None)
            if callable(describe):
                try:
                    version = str(describe(source))
                except Exception:  # older registry without aliases support: keep the ref as given
                    version = uri.ref
            return ResolvedSource(_weights_folder(path), version, uri.name)
        path = Path(source).expanduser()
        if not path.exists():
            raise UserError(f"model source {source}: folder does not exist")
        folder = _weights_folder(path)
        return ResolvedSource(folder, local_version(folder), None)

    def _backbone_for(self, path: Path, key_hint: str) -> str:
        resolved = str(Path(path).resolve())
        key = self._backbone_paths.get(resolved)
        if key is None:
            key = key_hint
            log.info("loading weights %s as %s", path, key)
            self.engine.add_backbone(key, Path(path))
            self._backbone_paths[resolved] = key
        return key

    # ---- adding and removing ----------------------------------------------------------------------
    def add_base(self, name: str, path: Path) -> ServedModel:
        with self._lock:
            key = self._backbone_for(path, f"base:{name}")
            model = ServedModel(name, "base", key, None, None, str(path), "base", Path(path))
            self.models[name] = model
            self.base_name = name
            return model

    def add(self, name: str, source: str, parent: str | None = None, hidden: bool = False) -> ServedModel:
        with self._lock:
            if name in self.models:
                raise UserError(f"model {name!r} is already served")
            resolved = self.resolve_source(source)
            folder = resolved.path
            if (folder / "adapter_config.json").is_file():
                base_path = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
                parent_name: str | None
                if parent is not None:
                    if parent not in self.models or self.models[parent].kind == "adapter":
                        raise UserError(f"model {name!r}: parent {parent!r} is not a served base/full model")
                    backbone = self.models[parent].backbone
                    parent_name = parent
                else:
                    backbone, parent_name = self._adapter_backbone(name, base_path)
                # peft refuses names with '.' and treats `__base__` as "no adapter": the engine gets its own key.
                self._adapters_added += 1
                adapter_key = f"adapter{self._adapters_added}"
                self.engine.add_adapter(adapter_key, folder, backbone)
                model = ServedModel(
                    name,
                    "adapter",
                    backbone,
                    adapter_key,
                    parent_name,
                    source,
                    resolved.version,
                    folder,
                    registry_name=resolved.registry_name,
                    hidden=hidden,
                )
            else:
                backbone = self._backbone_for(folder, f"full:{name}")
                model = ServedModel(
                    name,
                    "full",
                    backbone,
                    None,
                    None,
                    source,
                    resolved.version,
                    folder,
                    registry_name=resolved.registry_name,
                    hidden=hidden,
                )
            self.models[name] = model
            return model

    def _adapter_backbone(self, name: str, base_path: str) -> tuple[str, str | None]:
        """The backbone an adapter applies to: the served model whose weights match its recorded base."""
        from domaintune.model.config import ModelConfig
        from domaintune.model.loader import resolve_model_dir

        candidate = Path(base_path)
        if not candidate.is_dir():
            candidate = resolve_model_dir(ModelConfig(name_or_path=base_path))
        resolved = str(candidate.resolve())
        if resolved in self._backbone_paths:
            key = self._backbone_paths[resolved]
            parent = next((m.name for m in self.models.values() if m.backbone == key and m.kind != "adapter"), None)
            return key, parent
        log.info("adapter %s was trained on %s, which is not served yet: loading it", name, base_path)
        return self._backbone_for(candidate, f"base-of:{name}"), None

    def remove(self, name: str) -> ServedModel:
        with self._lock:
            model = self.models.get(name)
            if model is None:
                raise UserError(f"model {name!r} is not served")
            if model.kind == "base" and name == self.base_name:
                raise UserError(f"model {name!r} is the base model; it cannot be unloaded")
            if model.adapter is not None:  # kind "adapter"
                self.engine.remove_adapter(model.adapter)
            else:
                users = [m.name for m in self.models.values() if m.backbone == model.backbone and m.name != name]
                if users:
                    raise UserError(f"model {name!r} is the parent of {users}; unload those first")
                self.engine.remove_backbone(model.backbone)
                self._backbone_paths = {p: k for p, k in self._backbone_paths.items() if k != model.backbone}
            del self.models[name]
            return model

    def get(self, name: str) -> ServedModel | None:
        return self.models.get(name)

    def listed(self) -> list[ServedModel]:
        return [m for m in self.models.values() if not m.hidden]
