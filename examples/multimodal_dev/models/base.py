"""MultimodalModel: a vision encoder in front of a megatron-core GPTModel language decoder.

The model is architecture-agnostic: an architecture (see ``multimodal_dev.models``) supplies the
vision encoder (``pixel_values, image_grid_thw -> [n_image_tokens, hidden]`` in the image tokens'
order) and the GPTModel. ``forward`` takes the collated batch of DESIGN.md section 2 and

1. embeds the text with the language model's embedding (built with
   ``scatter_embedding_sequence_parallel=False``: the scatter happens here, after step 3);
2. runs the vision encoder and scatters its outputs at the image-token positions (a count
   mismatch is an error naming both counts);
3. ``_cp_split_for_forward``: splits the combined embeddings and every per-token tensor (tokens,
   labels, loss mask, position ids, padding mask) with one context-parallel index;
4. with sequence parallelism scatters the embeddings *and the padding mask* along the sequence
   (megatron-core 0.19.2's GPTModel does the mask's scatter only when it embeds ``input_ids``
   itself; with ``decoder_input`` the caller must give it the embeddings' layout);
5. calls ``GPTModel.forward`` with ``decoder_input``, ``packed_seq_params`` (THD) and
   ``padding_mask``; with labels it returns per-token losses ``[b, s_local]``.
"""
from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch

from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule

from megatron.mcore_ext.cp_split import split_batch_for_cp
from megatron.mcore_ext.router import sequence_ids

__all__ = ["MultimodalModel", "packed_seq_params_from_batch"]

_PER_TOKEN = ("tokens", "labels", "loss_mask", "position_ids", "padding_mask")


def packed_seq_params_from_batch(batch: dict) -> Optional[PackedSeqParams]:
    """PackedSeqParams (global boundaries: attention works on global positions under CP)."""
    if batch.get("cu_seqlens_padded") is None:
        return None
    cu, cu_p = batch["cu_seqlens"].int(), batch["cu_seqlens_padded"].int()
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        cu_seqlens_q_padded=cu_p,
        cu_seqlens_kv_padded=cu_p,
        max_seqlen_q=int(batch["max_seqlen"]),
        max_seqlen_kv=int(batch["max_seqlen"]),
    )


class MultimodalModel(MegatronModule):
    def __init__(
        self,
        language_model,
        vision_encoder: Optional[torch.nn.Module],
        image_token_id: Optional[int],
        mrope: bool = False,
    ):
        super().__init__(config=language_model.config)
        self.language_model = language_model
        self.vision_encoder = vision_encoder
        self.image_token_id = image_token_id
        self.mrope = mrope  # position ids [3, b, s] go to the decoder as they are
        self.pre_process = language_model.pre_process
        self.post_process = language_model.post_process
        self.model_type = ModelType.encoder_or_decoder  # what megatron's schedules look up
        # the architecture's variant settings (vision patching, vocabulary, special token ids) that
        # the data pipeline needs; set by the architecture's builder
        self.variant_config: dict = {}

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    # what megatron-core's finalize_model_grads asks of a pipeline stage (embedding/output tying)
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
        mask = (tokens == self.image_token_id).transpose(0, 1)  # [s, b], like emb
        # Image tokens in (b, s) order are the images' order; emb is [s, b]: go through [b, s].
        emb_bs = emb.transpose(0, 1)
        mask_bs = mask.transpose(0, 1)
        emb_bs = emb_bs.masked_scatter(mask_bs.unsqueeze(-1), img.to(emb.dtype))
        return emb_bs.transpose(0, 1).contiguous()

    def _cp_split_for_forward(self, batch: dict, decoder_input: Optional[torch.Tensor]) -> dict:
        """One CP index for the embeddings and every per-token tensor."""
        part = {k: batch[k] for k in _PER_TOKEN if batch.get(k) is not None}
        for k in ("cu_seqlens", "cu_seqlens_padded"):
            if batch.get(k) is not None:
                part[k] = batch[k]
        if decoder_input is not None:
            part["decoder_input"] = decoder_input
        cp = ps.get_context_parallel_world_size()
        return split_batch_for_cp(part, cp, ps.get_context_parallel_rank()) if cp > 1 else part

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        decoder_input = self._embed(batch) if self.pre_process else None
        local = self._cp_split_for_forward(batch, decoder_input)
        padding_mask = local.get("padding_mask")
        decoder_input = local.get("decoder_input")
        if self.config.sequence_parallel:
            if decoder_input is not None:
                decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(decoder_input)
            if padding_mask is not None:  # the same layout as the embeddings: [b, s/tp]
                padding_mask = (
                    tensor_parallel.scatter_to_sequence_parallel_region(padding_mask.transpose(0, 1).contiguous())
                    .transpose(0, 1)
                    .contiguous()
                )
        position_ids = local["position_ids"]
        if not self.mrope:
            position_ids = position_ids[0]  # text positions: the three MRoPE rows agree
        labels = local.get("labels")
        if labels is not None:
            labels = labels.clamp(min=0)  # -100 -> any id; loss_mask removes them
        with self._packed_sequence_ids(batch, local):
            return self.language_model(
                input_ids=local["tokens"],
                position_ids=position_ids,
                attention_mask=None,
                decoder_input=decoder_input,
                labels=labels,
                packed_seq_params=packed_seq_params_from_batch(batch),
                padding_mask=padding_mask,
            )

    def _packed_sequence_ids(self, batch: dict, local: dict):
        """THD: tell the routers which packed sample each of their tokens is in (seq_aux_loss
        normalises per sample), in the routers' layout: CP-split, then SP-scattered."""
        cu_p = batch.get("cu_seqlens_padded")
        lbl = self.config.moe_router_load_balancing_type
        if cu_p is None or "seq_aux_loss" not in (lbl if isinstance(lbl, (list, tuple)) else [lbl]):
            return contextlib.nullcontext()
        total = int(cu_p[-1])
        ids = torch.bucketize(torch.arange(total, device=cu_p.device), cu_p[1:].long(), right=True).view(1, -1)
        cp = ps.get_context_parallel_world_size()
        if cp > 1:
            part = {"seq_ids": ids, "cu_seqlens": batch["cu_seqlens"], "cu_seqlens_padded": cu_p}
            ids = split_batch_for_cp(part, cp, ps.get_context_parallel_rank(), seq_dims={"seq_ids": 1})["seq_ids"]
        ids = ids.transpose(0, 1).contiguous()  # [s, 1] like the hidden states
        if self.config.sequence_parallel:
            ids = tensor_parallel.scatter_to_sequence_parallel_region(ids)
        return sequence_ids(ids, num_sequences=cu_p.numel() - 1)
