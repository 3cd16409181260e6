"""Quiet start-up: one line of ours instead of megatron-core's import-time warnings.

megatron-core 0.19.2 warns on every rank, at import, that Transformer Engine and apex are absent
(about a dozen lines, one per module that has a fallback), and it warns about two of its own
defaults (``cuda_graph_scope`` "full scope is deprecated", the experimental MIMO config); torch
warns on CPU machines that there is no CUDA runtime. None of these is actionable for a user of
this stack: TE and apex are optional accelerators here. ``quiet_imports()`` (called before
megatron is imported) silences exactly these; ``accelerator_summary()`` is the one line the
trainer logs instead. ``setup_logging`` gives each rank its log destination.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
import warnings

__all__ = ["quiet_imports", "accelerator_summary", "setup_logging"]

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


def setup_logging(logging_args, rank: int) -> None:
    """Rank 0 logs to stderr; other ranks to ``--log-dir`` files (or only their warnings to
    stderr); megatron's known, harmless notices are kept out."""
    fmt = "%(asctime)s [rank %(rank)s] %(levelname)s %(name)s: %(message)s"

    class _RankFilter(logging.Filter):
        def filter(self, record):
            record.rank = rank
            return True

    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    if rank == 0:
        h: logging.Handler = logging.StreamHandler(sys.stderr)
    elif logging_args.log_dir:  # other ranks log to files (or only their warnings to stderr)
        os.makedirs(logging_args.log_dir, exist_ok=True)
        h = logging.FileHandler(os.path.join(logging_args.log_dir, f"rank{rank:05d}.log"))
    else:
        h = logging.StreamHandler(sys.stderr)
        h.setLevel(logging.WARNING)
    h.setFormatter(logging.Formatter(fmt))
    h.addFilter(_RankFilter())
    root.addHandler(h)
    root.setLevel(logging.INFO)
    for noisy in ("megatron", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # but our own extensions' notices (which kernels and layouts were chosen, graph captures) are kept
    logging.getLogger("megatron.mcore_ext").setLevel(logging.INFO)
    # known, harmless notices of megatron-core 0.19.2 that would repeat in every run
    for quiet in ("megatron.core.rerun_state_machine", "megatron.core.models.gpt.gpt_model",
                  "megatron.core.dist_checkpointing.strategies.torch"):
        logging.getLogger(quiet).setLevel(logging.ERROR)
