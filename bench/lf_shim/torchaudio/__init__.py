"""Import shim for LLaMA-Factory's benchmark process only (PYTHONPATH=bench/lf_shim).

LLaMA-Factory's data module imports torchaudio at module level for its audio plugin; no torchaudio
build matches the CPU torch 2.13.0, and a text-only run never touches audio. Any real use fails loudly.
"""


def __getattr__(name):
    raise ImportError(f"torchaudio.{name}: this is a text-only benchmark shim, audio is not available")
