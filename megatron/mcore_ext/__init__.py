"""Model-agnostic additions to Megatron-Core 0.19.2 (upstreamable).

* ``cpu_runtime``: lets megatron-core run on CPU with gloo when no GPU is present.
* ``cp_split``: context-parallel (zigzag BSHD / per-sample THD) index helpers.
* ``testing``: spawn N gloo ranks with megatron's parallel state for multi-rank tests.

This lives in the ``megatron`` namespace package next to ``megatron.core``; there is deliberately
no ``megatron/__init__.py`` so the installed megatron-core keeps owning ``megatron.core``.
"""
