"""Test plugin (``pretrain_multimodal.py --plugin tests/plugins/format2_local_keys.py``): the trainer
writes checkpoints as format 2 did with ``--transformer-impl local`` -- megatron-core's own local
layer spec keys (its ``sharded_state_dict_keys_map``: a MoE layer's pre-MLP norm under
``mlp.linear_fc1.layer_norm_``, a Gated DeltaNet layer's input norm under ``linear_qkv``'s) and
``format: 2`` -- for ``tests/unit/test_faults.py``; the product code has no hook.
"""
from megatron.mcore_ext import spec

from multimodal_dev import checkpointing


def _megatron_local_keys(block):
    return block  # format 2: the keys map of megatron's local spec, untouched


spec._with_te_norm_keys = _megatron_local_keys
checkpointing.FORMAT = 2
