"""domaintune: turn an open LLM into a domain expert, from raw business data to a served model."""

__version__ = "0.1.0"
