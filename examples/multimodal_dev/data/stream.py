"""The one batching path: samples -> this data-parallel rank's micro-batches, iteration by iteration.

``MicroBatchStream(provider, collate_config, ...)`` reads the provider's samples and collates
them (``pack_or_pad_batch``) into ``num_microbatches`` micro-batches of ``micro_batch_size``
samples per iteration for DP rank ``dp_rank`` of ``dp_size``:

* ``provider.global_order`` (generated data, e.g. ``mock``): every DP rank reads the one global
  sample stream and keeps its block of each global batch: rank r of D gets samples
  ``[r*G/D, (r+1)*G/D)`` of global batch i (G = micro_batch_size x num_microbatches x D). The
  micro-batches are then the same whatever the DP size (a DP=2 run sees exactly the micro-batches a
  DP=1 run with twice the micro-batches sees), which makes parallel layouts comparable.
* otherwise (files, e.g. ``webdataset``): each DP rank reads its own part of the data (what large
  runs need: no rank reads every sample).

Samples longer than the collate's ``target_seqlen`` are skipped and counted by the provider's
iterator unless the collate truncates them. ``state_dict()`` is the sample position (saved with a
checkpoint); a stream opened with it yields what the uninterrupted one would have, whatever the
micro-batch size of the resumed run.

``open_data(data_args, data_spec, ...)`` builds a run's provider (vocabulary and vision settings from
the model's ``DataSpec``) and, on the ranks that read data, its stream.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Optional

from multimodal_dev.data.collate import CollateConfig, pack_or_pad_batch

__all__ = ["MicroBatchStream", "open_data"]


class MicroBatchStream:
    def __init__(self, provider, collate_config: CollateConfig, *, micro_batch_size: int, num_microbatches: int,
                 dp_rank: int = 0, dp_size: int = 1, state: Optional[Mapping] = None):
        if micro_batch_size < 1 or num_microbatches < 1:
            raise ValueError(f"micro_batch_size and num_microbatches must be >= 1, got {micro_batch_size}, "
                             f"{num_microbatches}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, dp_size={dp_size}")
        provider.check_collate_config(collate_config)
        self.provider = provider
        self.collate_config = collate_config
        self.global_order = bool(provider.global_order)
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.micro_batch_size, self.num_microbatches = micro_batch_size, num_microbatches
        self.micro_batches = 0
        max_tokens = None if collate_config.truncate else collate_config.target_seqlen
        r, d = (0, 1) if self.global_order else (dp_rank, dp_size)
        self._samples = provider.samples(r, d, state=state, max_tokens=max_tokens)

    @property
    def samples_per_rank(self) -> int:
        return self.micro_batch_size * self.num_microbatches

    @property
    def stats(self) -> dict:
        """The sample iterator's counts (samples read, skipped samples and shards, ...) and the
        micro-batches made. A global-order stream is read whole by every DP rank: count it once."""
        return {**self._samples.stats, "micro_batches": self.micro_batches}

    @property
    def counts_skips(self) -> bool:
        """Whether this rank's skip counts are its own (not a copy of another DP rank's)."""
        return not self.global_order or self.dp_rank == 0

    def state_dict(self) -> dict:
        return self._samples.state_dict()

    def skip_iterations(self, n: int) -> None:
        """Fast-forward ``n`` iterations (when no saved data position could be restored)."""
        per_iter = self.samples_per_rank * (self.dp_size if self.global_order else 1)
        for _ in range(n * per_iter):
            next(self._samples)

    def next_iteration(self) -> list[dict]:
        """This rank's micro-batches of the next iteration."""
        n = self.samples_per_rank
        if self.global_order:
            everyone = [next(self._samples) for _ in range(n * self.dp_size)]
            mine = everyone[self.dp_rank * n:(self.dp_rank + 1) * n]
        else:
            mine = [next(self._samples) for _ in range(n)]
        mbs = self.micro_batch_size
        out = [pack_or_pad_batch(mine[i * mbs:(i + 1) * mbs], self.collate_config)
               for i in range(self.num_microbatches)]
        self.micro_batches += len(out)
        return out


def open_data(data_args, data_spec, *, seed: int, seq_multiple: int, reads_data: bool, dp_rank: int,
              dp_size: int, state: Optional[Mapping] = None):
    """``(provider, stream)`` of a run: ``data_args`` is the trainer's data section (provider,
    paths, tokenizer, batch sizes, sequence length, layout), ``data_spec`` the model's; the stream
    is None on ranks that do not read data. A provider that cannot be made (a ``--tokenizer`` without
    the special tokens or with ids the model does not have, a chat template that does not work,
    missing ``--data-path`` shards) is a ``SetupError``: its message names the flag."""
    from multimodal_dev.data.providers import DataConfig, available_providers, build_provider
    from multimodal_dev.models.contract import SetupError

    d = data_args
    if d.provider not in available_providers():
        raise SetupError(f"--dataset-provider {d.provider!r} is unknown; available: {available_providers()}")
    try:
        provider = build_provider(DataConfig.from_data_spec(
            data_spec, provider=d.provider, data_path=list(d.data_path), seed=seed, tokenizer_path=d.tokenizer,
            chat_template=d.chat_template, answer_only_loss=d.answer_only_loss, max_bad_samples=d.max_bad_samples))
    except SetupError:
        raise
    except (OSError, ValueError) as e:  # the tokenizer, its chat template, the shards: named in the message
        raise SetupError(str(e)) from e
    if not reads_data:
        return provider, None
    collate = provider.collate_config(layout="thd" if d.packed else "bshd", target_seqlen=d.seq_length,
                                      divisible_by=math.lcm(seq_multiple, d.sample_multiple) if d.packed else seq_multiple,
                                      truncate=d.truncate,
                                      row_multiple=d.row_multiple if d.packed else 1)
    stream = MicroBatchStream(provider, collate, micro_batch_size=d.micro_batch_size,
                              num_microbatches=d.num_microbatches, dp_rank=dp_rank, dp_size=dp_size, state=state)
    return provider, stream
