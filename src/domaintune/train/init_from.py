"""Where training starts: the base model folder, or a model or adapter named by `train.init_from`.

`init_from` and the distillation teacher may name a folder (relative to the YAML's folder) or a
`registry://name@alias` URI, resolved through the registry (its checksums verified).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from domaintune.errors import UserError
from domaintune.model.config import ModelConfig
from domaintune.model.loader import is_adapter_dir, resolve_model_dir
from domaintune.registry.uri import is_registry_uri

if TYPE_CHECKING:
    from domaintune.config import ProjectConfig


@dataclass(frozen=True)
class Start:
    """What the trainable model is built from."""

    model_cfg: ModelConfig  # the `model:` section, pointing at init_from's full model when it names one
    model_dir: Path  # plain Hugging Face folder of the base weights
    init_ref: Path | None = None  # the folder init_from resolved to
    init_adapter: Path | None = None  # an adapter (init_from) to keep training


def config_relative(ref: str, cfg: ProjectConfig) -> Path:
    """`ref` as a path: relative ones are taken beside the YAML when something exists there."""
    path = Path(ref).expanduser()
    if not path.is_absolute() and cfg.config_path is not None and (cfg.base_dir / path).exists():
        return cfg.base_dir / path
    return path


def resolve_model_reference(ref: str, cfg: ProjectConfig) -> Path:
    """`registry://name@alias` through the registry; otherwise a local folder."""
    if is_registry_uri(ref):
        from domaintune.registry import registry_from_config  # lazy: the registry stage is optional here

        return Path(registry_from_config(cfg).resolve(ref))
    path = config_relative(ref, cfg)
    if not path.is_dir():
        raise UserError(f"train.init_from: {ref} is not a folder or a registry:// uri")
    return path


def resolve_start(cfg: ProjectConfig) -> Start:
    """The base model, replaced by a full model from `train.init_from`; an adapter there is continued."""
    model_cfg = cfg.model
    init_ref = init_adapter = None
    if cfg.train.init_from:
        init_ref = resolve_model_reference(cfg.train.init_from, cfg)
        if is_adapter_dir(init_ref):
            init_adapter = init_ref
        elif (init_ref / "config.json").is_file():
            model_cfg = model_cfg.model_copy(update={"name_or_path": str(init_ref)})
        else:
            raise UserError(f"train.init_from: {init_ref} holds neither an adapter nor a model")
    return Start(model_cfg, resolve_model_dir(model_cfg), init_ref, init_adapter)
