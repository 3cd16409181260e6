"""``checkpoint_keys``: a load template's model keys against a real ``dist_checkpointing`` save.

The modules stand in for the two backends' layers the way megatron builds their sharded state
(``transformer.utils.sharded_state_dict_default``): a norm without extra state (megatron's local
norm) and one with it (Transformer Engine's norms keep an ``_extra_state``: ``get_extra_state``).
"""
import pytest
import torch

from megatron.mcore_ext.testing import run_distributed


class _LocalNorm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(4))  # from the seed: differs between the two models


class _TENorm(_LocalNorm):  # TE's norms: an extra state (empty in bf16) beside the weight
    def get_extra_state(self):
        return torch.empty(0, dtype=torch.uint8)

    def set_extra_state(self, state):
        self.loaded_extra_state = state


def _layer(norm_cls):
    layer = torch.nn.Module()
    layer.norm = norm_cls()
    layer.proj = torch.nn.Linear(4, 4, bias=False)
    return layer


def _sharded(module):
    from megatron.core.transformer.utils import sharded_state_dict_default

    return {name: sharded_state_dict_default(child, prefix=f"layer.{name}.") for name, child in module.named_children()}


def _flat(tree):
    return {k2: v2 for v in tree.values() for k2, v2 in v.items()}


def _save_then_load(tmp, saved_cls, loading_cls, rename=None):
    import logging
    import os

    from megatron.core import dist_checkpointing

    from multimodal_dev.checkpoint_keys import check_model_keys, restore_fresh_extra_states, stored_metadata
    from multimodal_dev.checkpointing import CheckpointError, _in_process_results_queue

    _in_process_results_queue()  # as the trainer's saves (no queue server process)
    os.makedirs(tmp)
    torch.manual_seed(0)
    saved = _layer(saved_cls)
    torch.manual_seed(1)  # the loading model's own init differs: equal weights mean loaded ones
    dist_checkpointing.save({"model": _flat(_sharded(saved))}, tmp)
    stored = stored_metadata(tmp)
    loading = _layer(loading_cls)
    template = {"model": _flat(_sharded(loading))}
    if rename:
        template["model"]["layer.norm.weight"].key = rename
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("multimodal_dev.checkpoint_keys").addHandler(handler)
    logging.getLogger("multimodal_dev.checkpoint_keys").setLevel(logging.INFO)
    try:
        fresh = check_model_keys(template["model"], stored, tmp)
    except CheckpointError as e:
        return {"error": str(e)}
    loaded = dist_checkpointing.load(template, tmp)
    restore_fresh_extra_states(loaded["model"], fresh)
    loading.load_state_dict({k[len("layer."):]: v for k, v in loaded["model"].items()}, strict=True)
    return {"fresh": fresh, "log": [r.getMessage() for r in records],
            "equal": all(torch.equal(p, dict(loading.named_parameters())[n]) for n, p in saved.named_parameters()),
            "extra": getattr(loading.norm, "loaded_extra_state", "not called")}


def test_a_checkpoint_without_te_extra_states_loads_into_modules_that_keep_them(tmp_path):
    """local -> TE: the norm's extra state is not in the checkpoint; it is loaded as None (TE: no
    saved state), counted in the log, and every weight is restored."""
    out = run_distributed(_save_then_load, 1, args=(str(tmp_path / "c"), _LocalNorm, _TENorm))[0]
    assert out["fresh"] == [("layer.norm._extra_state",)]
    assert out["extra"] is None and out["equal"]
    assert any("1 Transformer Engine extra states" in m for m in out["log"]), out["log"]


def test_extra_states_the_loading_model_does_not_keep_are_left_in_the_checkpoint(tmp_path):
    """TE -> local: the checkpoint's extra state is simply not asked for."""
    out = run_distributed(_save_then_load, 1, args=(str(tmp_path / "c"), _TENorm, _LocalNorm))[0]
    assert out["fresh"] == [] and out["equal"] and out["log"] == []


def test_a_weight_the_checkpoint_lacks_is_named(tmp_path):
    """A weight stored under another key (what the local backend's MoE norms were before format 3)
    is named in the error, not hidden in a list of every stored key."""
    out = run_distributed(_save_then_load, 1, args=(str(tmp_path / "c"), _LocalNorm, _LocalNorm),
                          kwargs={"rename": "layer.mlp.linear_fc1.layer_norm_weight"})[0]
    assert "1 weight(s) of this model are not in the checkpoint: layer.mlp.linear_fc1.layer_norm_weight" in out["error"]
    assert "layer.proj.weight" not in out["error"]


def test_format_2_local_keys_reach_every_leaf_that_names_the_norm():
    """A format-2 local checkpoint (MoE pre-MLP norm under ``mlp.linear_fc1.layer_norm_``) loaded by
    this code: the weight, its Adam moment, and -- when the loading run's distributed optimizer asks
    for an fp32 main parameter the plain fp32 optimizer never stored -- the main parameter, which is
    then taken from the weight under its former key (``optimizer_state.find_main_parameters``).
    A format-3 checkpoint is read as it is."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from multimodal_dev.checkpoint_keys import read_format2_local_keys
    from multimodal_dev.optimizer_state import find_main_parameters

    new, old = "d.layers.0.pre_mlp_layernorm.weight", "d.layers.0.mlp.linear_fc1.layer_norm_weight"

    def template():
        leaf = lambda key: ShardedTensor.from_rank_offsets(key, torch.zeros(4), replica_id=0)  # noqa: E731
        return {"model": {"n": leaf(new)}, "optimizer": {"tensors": {
            "0": leaf("optimizer.state.param." + new), "1": leaf("optimizer.state.exp_avg." + new)}}}

    stored = {k: ShardedTensor.from_rank_offsets(k, torch.zeros(4), replica_id=0)
              for k in (old, "optimizer.state.exp_avg." + old)}
    t = template()
    assert read_format2_local_keys(t, stored, "/ck", written_format=2) == 3
    assert t["model"]["n"].key == old and t["optimizer"]["tensors"]["1"].key == "optimizer.state.exp_avg." + old
    tensors = t["optimizer"]["tensors"]
    assert find_main_parameters([tensors["0"], tensors["1"]], stored) == {0: old}
    t3 = template()
    assert read_format2_local_keys(t3, stored, "/ck", written_format=3) == 0 and t3["model"]["n"].key == new
