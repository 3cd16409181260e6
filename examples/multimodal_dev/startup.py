"""Quiet start-up: one line of ours instead of megatron-core's import-time warnings.

megatron-core 0.19.2 warns on every rank, at import, that Transformer Engine and apex are absent
(about a dozen lines, one per module that has a fallback), and it warns about two of its own
defaults (``cuda_graph_scope`` "full scope is deprecated", the experimental MIMO config); torch
warns on CPU machines that there is no CUDA runtime. None of these is actionable for a user of
this stack: TE and apex are optional accelerators here. ``quiet_imports()`` (called before
megatron is imported) silences exactly these; ``accelerator_summary()`` is the one line the
trainer logs instead.
"""
from __future__ import annotations

import importlib.util
import logging
import warnings

__all__ = ["quiet_imports", "accelerator_summary"]

_MESSAGES = (
    r".*(Transformer Engine|Apex|apex|absl).*",
    r"full scope is deprecated.*",
    r"MimoModelConfig is experimental.*",
)


def quiet_imports() -> None:
    for pattern in _MESSAGES:
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def _version(module: str) -> str:
    if importlib.util.find_spec(module) is None:
        return "not installed"
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # installed but broken (e.g. a missing CUDA library)
        return f"not importable ({type(e).__name__})"
    return f"v{getattr(mod, '__version__', '?')}"


def accelerator_summary() -> str:
    return (f"optional accelerators: Transformer Engine {_version('transformer_engine')}, apex {_version('apex')} "
            "(what is missing falls back to pure-PyTorch kernels)")
