"""Base-model resolution and loading, shared by train, eval, export and serve."""

from domaintune.model.config import ModelConfig

__all__ = ["ModelConfig"]
