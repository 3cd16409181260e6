"""MultimodalModel: a vision encoder in front of a megatron-core GPTModel language decoder.

The model is architecture-agnostic: an architecture (see ``multimodal_dev.models.registry``)
supplies the vision encoder (``pixel_values, image_grid_thw -> [n_image_tokens, hidden]`` in the
image tokens' order), the GPTModel, its ``DataSpec`` and its FLOP count. ``forward`` takes the
collated batch of ``docs/batch.md`` (whole, not yet split for context parallelism) and

1. embeds the text with the language model's embedding (built with
   ``scatter_embedding_sequence_parallel=False``: the scatter happens here, after step 3);
2. runs the vision encoder and scatters its outputs at the image-token positions (a count
   mismatch is an error naming both counts);
3. splits the combined embeddings and every per-token tensor it uses (tokens, labels, position
   ids, padding mask, sequence ids) with the micro-batch's one context-parallel index
   (``cp_index``, computed once by ``forward_step`` and reused there for the loss mask);
4. with sequence parallelism scatters the embeddings, the padding mask and the sequence ids
   along the sequence (megatron-core 0.19.2's GPTModel does the mask's scatter only when it embeds
   ``input_ids`` itself; with ``decoder_input`` the caller must give it the embeddings' layout);
5. hands the packed samples' sequence ids to its padding-aware routers (``seq_aux_loss``
   normalises per packed sample) and calls ``GPTModel.forward`` with ``decoder_input``,
   ``packed_seq_params`` (THD) and ``padding_mask``; with labels it returns per-token losses
   ``[b, s_local]``; with ``return_logits=True`` the output layer's vocabulary-parallel logits
   ``[s_local, b, V/TP]`` instead (no TP gather; knowledge distillation, ``multimodal_dev.distill``).

The interface the trainer uses (``models.contract``): ``config``, ``decoder_layers()``,
``data_spec``, ``flops_per_batch(batch)``, and for ``--freeze-*`` ``parameter_parts()`` /
``freeze(parts)``: the parts are "vision" (the vision encoder without its projector), "projector"
(the vision encoder's module that maps into the language model's hidden size, when the
architecture names one: ``projector=``) and "language" (the language model).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch

from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule

from megatron.mcore_ext.cp_split import cp_partition_index, split_batch_for_cp
from megatron.mcore_ext.packed_seq import HostPackedSeqParams
from megatron.mcore_ext.router import PaddingAwareTopKRouter
from multimodal_dev.models.contract import DataSpec

__all__ = ["MultimodalModel", "packed_seq_params_from_batch"]

_PER_TOKEN = ("tokens", "labels", "loss_mask", "position_ids", "padding_mask", "sequence_ids")


def packed_seq_params_from_batch(batch: dict) -> Optional[PackedSeqParams]:
    """PackedSeqParams (global boundaries: attention works on global positions under CP), with the
    collate's host copy of the padded boundaries when the batch has it (``HostPackedSeqParams``)."""
    if batch.get("cu_seqlens_padded") is None:
        return None
    cu, cu_p = batch["cu_seqlens"].int(), batch["cu_seqlens_padded"].int()
    host = batch.get("cu_seqlens_padded_host")
    return HostPackedSeqParams(
        cu_seqlens_q_padded_cpu=None if host is None else torch.tensor(host, dtype=torch.int64),
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        cu_seqlens_q_padded=cu_p,
        cu_seqlens_kv_padded=cu_p,
        max_seqlen_q=int(batch["max_seqlen"]),
        max_seqlen_kv=int(batch["max_seqlen"]),
    )


def _sp_scatter_bs(t: torch.Tensor) -> torch.Tensor:
    """Scatter a [b, s] per-token tensor over the sequence like the [s, b, h] embeddings."""
    return tensor_parallel.scatter_to_sequence_parallel_region(t.transpose(0, 1).contiguous()).transpose(0, 1)


class MultimodalModel(MegatronModule):
    def __init__(
        self,
        language_model,
        vision_encoder: Optional[torch.nn.Module],
        image_token_id: Optional[int],
        mrope: bool = False,
        data_spec: Optional[DataSpec] = None,
        flops_fn: Optional[Callable[[dict], Any]] = None,
        projector: Optional[torch.nn.Module] = None,
    ):
        super().__init__(config=language_model.config)
        self.language_model = language_model
        self.vision_encoder = vision_encoder
        self.image_token_id = image_token_id
        self.mrope = mrope  # position ids [3, b, s] go to the decoder as they are
        self.pre_process = language_model.pre_process
        self.post_process = language_model.post_process
        self.model_type = ModelType.encoder_or_decoder  # what megatron's schedules look up
        self.data_spec = data_spec if data_spec is not None else DataSpec(
            vocab_size=language_model.vocab_size, image_token_id=image_token_id)
        self._flops_fn = flops_fn
        self._routers = [m for m in language_model.modules() if isinstance(m, PaddingAwareTopKRouter)]
        # a submodule of the vision encoder, held in a list: registering it again here would give
        # its weights a second name in the state dict
        self._projector = [projector] if projector is not None else []

    # ------------------------------------------------------------------ the trainer's interface
    def decoder_layers(self) -> list[torch.nn.Module]:
        """The language decoder's layers on this pipeline stage, in order."""
        return list(self.language_model.decoder.layers)

    def flops_per_batch(self, batch: dict) -> float:
        """Useful forward + backward FLOPs of the real tokens and images of a collated batch
        (``flops_fn`` may give one number or a per-part dict with its ``"total"``)."""
        if self._flops_fn is None:
            raise NotImplementedError("this architecture gives no FLOP count (flops_fn)")
        count = self._flops_fn(batch)
        return float(count["total"] if isinstance(count, dict) else count)

    def parameter_parts(self) -> dict[str, list[torch.nn.Parameter]]:
        """This rank's parameters by part ("vision", "projector", "language"; module docstring),
        each parameter in exactly one part; a part this rank does not hold (a later pipeline stage
        has no vision encoder) or the model does not have is an empty list."""
        proj = [p for m in self._projector for p in m.parameters()]
        in_proj = {id(p) for p in proj}
        vision = [] if self.vision_encoder is None else [
            p for p in self.vision_encoder.parameters() if id(p) not in in_proj]
        return {"vision": vision, "projector": proj, "language": list(self.language_model.parameters())}

    def freeze(self, parts) -> list[torch.nn.Parameter]:
        """Stop training ``parts`` (names of ``parameter_parts``); returns the frozen parameters.

        Their ``requires_grad`` turns False, which must happen before the DDP wrap: megatron-core's
        DDP then gives them no gradient buffer and ``get_megatron_optimizer`` no state. A router
        whose own parameters are all frozen also keeps its expert bias: megatron's
        ``frozen_expert_bias``, which ``finalize_model_grads`` honours (its token counts are still
        reset every step)."""
        by_part = self.parameter_parts()
        frozen = [p for part in parts for p in by_part[part]]
        for p in frozen:
            p.requires_grad_(False)
        for m in self.modules():
            own = list(m.parameters(recurse=False))
            if getattr(m, "expert_bias", None) is not None and own and not any(p.requires_grad for p in own):
                m.frozen_expert_bias = True
        return frozen

    # what megatron-core's schedules and finalize_model_grads ask of a model / pipeline stage
    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return self.language_model.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    # ------------------------------------------------------------------------------------
    def _embed(self, batch: dict) -> torch.Tensor:
        tokens = batch["tokens"]
        pos = None
        if getattr(self.language_model.embedding, "add_position_embedding", False):
            pos = batch["position_ids"][0]  # learned absolute positions (text ids)
        emb = self.language_model.embedding(input_ids=tokens, position_ids=pos)  # [s, b, h]
        n_img_tok = batch.get("image_tokens")  # the collate's host count (docs/batch.md)
        if n_img_tok is None:  # a batch built by hand: counted on the device, one host read
            n_img_tok = int((tokens == self.image_token_id).sum()) if self.image_token_id is not None else 0
        pv = batch.get("pixel_values")
        if pv is None:
            if n_img_tok:
                raise ValueError(
                    f"batch has {n_img_tok} image tokens (id {self.image_token_id}) but no pixel_values"
                )
            return emb
        if self.vision_encoder is None:
            raise ValueError("batch has pixel_values but this model has no vision encoder")
        img = self.vision_encoder(pv, batch["image_grid_thw"])  # [n, h]
        if img.shape[0] != n_img_tok:
            raise ValueError(
                f"the vision encoder produced {img.shape[0]} image embeddings but the text has "
                f"{n_img_tok} image tokens (id {self.image_token_id}); grids: "
                f"{batch['image_grid_thw'].tolist()}"
            )
        # Image tokens in (b, s) order are the images' order; emb is [s, b]: go through [b, s].
        emb_bs = emb.transpose(0, 1)
        mask_bs = tokens == self.image_token_id
        emb_bs = emb_bs.masked_scatter(mask_bs.unsqueeze(-1), img.to(emb.dtype))
        return emb_bs.transpose(0, 1).contiguous()

    def _local(self, batch: dict, decoder_input: Optional[torch.Tensor], cp_index) -> dict:
        """This CP rank's embeddings and per-token tensors: one index for all of them."""
        part = {k: batch[k] for k in _PER_TOKEN if batch.get(k) is not None}
        if decoder_input is not None:
            part["decoder_input"] = decoder_input
        cp = ps.get_context_parallel_world_size()
        if cp == 1:
            return part
        rank = ps.get_context_parallel_rank()
        if cp_index is None:
            cp_index = cp_partition_index(batch, cp, rank)
        return split_batch_for_cp(part, cp, rank, index=cp_index)

    def forward(self, batch: dict[str, Any], cp_index: Optional[torch.Tensor] = None, *,
                return_logits: bool = False) -> torch.Tensor:
        """``batch``: the whole collated micro-batch; ``cp_index``: this CP rank's token index
        (``cp_split.cp_partition_index``), computed here when not given. ``return_logits``: the
        last pipeline stage returns the logits ``[s_local, b, V/TP]`` (this rank's vocabulary
        slice, whole CP-local sequence) instead of the per-token losses; other stages are as ever."""
        decoder_input = self._embed(batch) if self.pre_process else None
        local = self._local(batch, decoder_input, cp_index)
        padding_mask = local.get("padding_mask")
        sequence_ids = local.get("sequence_ids")
        decoder_input = local.get("decoder_input")
        if self.config.sequence_parallel:
            if decoder_input is not None:
                decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(decoder_input)
            if padding_mask is not None:  # the same layout as the embeddings: [b, s/tp]
                padding_mask = _sp_scatter_bs(padding_mask)
            if sequence_ids is not None:
                sequence_ids = _sp_scatter_bs(sequence_ids)
        n_sequences = None if batch.get("cu_seqlens_padded") is None else batch["cu_seqlens_padded"].numel() - 1
        for router in self._routers:  # [s_local, b] like the routers' tokens; None: BSHD rows
            router.set_sequence_ids(None if sequence_ids is None else sequence_ids.transpose(0, 1), n_sequences)
        position_ids = local["position_ids"]
        if not self.mrope:
            position_ids = position_ids[0]  # text positions: the three MRoPE rows agree
        labels = local.get("labels")
        if labels is not None:
            labels = labels.clamp(min=0)  # -100 -> any id; loss_mask removes them
        # the loss positions and the collate's host count of them: a language model may run its
        # LM head on those rows only (Qwen35GPTModel, mcore_ext.lm_head_rows)
        loss_rows = batch.get("loss_tokens")
        return self.language_model(
            input_ids=local["tokens"],
            position_ids=position_ids,
            attention_mask=None,
            decoder_input=decoder_input,
            labels=labels,
            loss_mask=local.get("loss_mask"),
            packed_seq_params=packed_seq_params_from_batch(batch),
            padding_mask=padding_mask,
            **({"output_processor": _vocab_parallel_logits} if return_logits
               else {"output_processor_context": {"loss_rows": loss_rows}} if loss_rows is not None else {}),
        )


def _vocab_parallel_logits(*, hidden_states, output_layer, output_weight, scale_logits, **unused):
    """GPTModel's ``output_processor`` for ``return_logits``: the output layer without its TP
    gather (``[s, b, V/TP]``), scaled as GPTModel scales its logits (MuP)."""
    logits, _ = output_layer(hidden_states, weight=output_weight, runtime_gather_output=False)
    return scale_logits(logits)
