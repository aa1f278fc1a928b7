"""`export.ollama_parameters` carries the eval's repetition penalty into the Ollama Modelfile."""

from __future__ import annotations

from domaintune.export.config import ExportConfig
from domaintune.export.modelfile import ollama_modelfile


def test_repeat_penalty_from_ollama_parameters_is_a_parameter_line():
    ecfg = ExportConfig.model_validate({"ollama_parameters": {"repeat_penalty": 1.05}})
    text = ollama_modelfile("m-q8_0.gguf", "<|im_start|>", ["<|im_end|>"], parameters=ecfg.ollama_parameters)
    assert "PARAMETER repeat_penalty 1.05\n" in text.splitlines(keepends=True)
    assert "repeat_penalty" not in ollama_modelfile("m-q8_0.gguf", "<|im_start|>", ["<|im_end|>"])
