"""The parallel layout of a run, computed and validated once (torchtitan's ``ParallelDims``).

``Layout`` holds the sizes (TP, PP, CP, EP, expert TP, DP from the rest of the world size) and
answers the questions the flag checks, the collate configuration and the loop ask of them:

* ``seq_multiple``: the multiple every THD sample / BSHD row needs (``required_seq_multiple``:
  2 x CP for the zigzag split, CP x TP with sequence parallelism);
* ``reads_data(tp_rank)``: the first rank of each tensor-parallel group reads the data and
  broadcasts it to its TP peers; every pipeline stage and every CP rank reads (each stage needs the
  per-token tensors: the padding mask reaches the MoE layers of every stage);
* ``counts_once(...)``: the one rank per data-parallel replica whose token counts enter the
  global metrics (the reader on CP rank 0 of the first stage);
* ``initialize()``: megatron's parallel state for these sizes.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from multimodal_dev.data.collate import required_seq_multiple

__all__ = ["Layout"]


@dataclasses.dataclass(frozen=True)
class Layout:
    world_size: int
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    etp: Optional[int] = None  # expert tensor parallel size; None = tp (megatron's default)
    sequence_parallel: bool = False

    def __post_init__(self):
        for flag, v in (("--tensor-model-parallel-size", self.tp), ("--pipeline-model-parallel-size", self.pp),
                        ("--context-parallel-size", self.cp), ("--expert-model-parallel-size", self.ep),
                        ("--expert-tensor-parallel-size", self.expert_tp)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{flag} must be >= 1, got {v}")
        if self.world_size % (self.tp * self.pp * self.cp):
            raise ValueError(
                f"world size {self.world_size} is not divisible by --tensor-model-parallel-size x "
                f"--pipeline-model-parallel-size x --context-parallel-size = {self.tp}x{self.pp}x{self.cp}"
            )
        if self.world_size % (self.expert_tp * self.ep * self.pp):
            raise ValueError(
                f"world size {self.world_size} is not divisible by --expert-tensor-parallel-size x "
                f"--expert-model-parallel-size x --pipeline-model-parallel-size = "
                f"{self.expert_tp}x{self.ep}x{self.pp}"
            )
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("--sequence-parallel needs --tensor-model-parallel-size > 1")

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp * self.cp)

    @property
    def seq_multiple(self) -> int:
        return required_seq_multiple(self.tp, self.cp, self.sequence_parallel)

    @staticmethod
    def reads_data(tp_rank: int) -> bool:
        return tp_rank == 0

    @staticmethod
    def counts_once(tp_rank: int, cp_rank: int, pp_rank: int) -> bool:
        return tp_rank == 0 and cp_rank == 0 and pp_rank == 0

    def describe(self) -> str:
        return f"TP={self.tp}{'+SP' if self.sequence_parallel else ''} PP={self.pp} CP={self.cp} EP={self.ep} DP={self.dp}"

    def initialize(self) -> None:
        from megatron.core import parallel_state as ps

        ps.initialize_model_parallel(
            tensor_model_parallel_size=self.tp,
            pipeline_model_parallel_size=self.pp,
            context_parallel_size=self.cp,
            expert_model_parallel_size=self.ep,
            expert_tensor_parallel_size=self.etp,
        )
