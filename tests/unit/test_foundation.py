"""Packaging (namespace portion), the multi-rank test harness, and the README's demo."""
import os
import pathlib

import pytest

from megatron.mcore_ext.testing import DistributedTestError, run_distributed

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_megatron_namespace_is_shared_not_shadowed():
    import megatron
    import megatron.core
    import megatron.mcore_ext

    import multimodal_dev

    assert not (REPO / "megatron" / "__init__.py").exists()
    assert "site-packages" in megatron.core.__file__, megatron.core.__file__
    assert megatron.core.__version__.split("+")[0] == "0.19.2"  # it appends the cwd's git hash
    assert pathlib.Path(megatron.mcore_ext.__file__).is_relative_to(REPO / "megatron") or (
        "site-packages" in megatron.mcore_ext.__file__
    )
    assert len(list(megatron.__path__)) >= 2  # our portion and megatron-core's
    assert pathlib.Path(multimodal_dev.__file__).parent.name == "multimodal_dev"


def _ranks_and_groups():
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    return {
        "rank": dist.get_rank(),
        "tp": (ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()),
        "cp": (ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()),
        "ep": ps.get_expert_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
    }


def _fail_on_rank_1():
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("deliberate failure on rank 1")
    dist.barrier()  # rank 0 would wait here forever: the harness must kill it
    return "unreachable"


def test_run_distributed_layouts_and_rank_order():
    res = run_distributed(_ranks_and_groups, world_size=4, tp=2, cp=2)
    assert [r["rank"] for r in res] == [0, 1, 2, 3]
    assert [r["tp"] for r in res] == [(2, 0), (2, 1), (2, 0), (2, 1)]
    assert [r["cp"] for r in res] == [(2, 0), (2, 0), (2, 1), (2, 1)]
    assert all(r["dp"] == 1 for r in res)
    # the same pool, another layout: the state of the previous call was torn down
    res = run_distributed(_ranks_and_groups, world_size=4, ep=2)
    assert all(r["tp"] == (1, 0) and r["ep"] == 2 and r["dp"] == 4 for r in res)


def test_run_distributed_reports_failures_and_recovers():
    with pytest.raises(DistributedTestError, match="deliberate failure on rank 1"):
        run_distributed(_fail_on_rank_1, world_size=2, timeout=120)
    res = run_distributed(_ranks_and_groups, world_size=2, tp=2)  # a fresh pool works
    assert [r["tp"][1] for r in res] == [0, 1]


def _threads_and_groups():
    """This rank's native threads (a gloo process group runs a loop thread and worker threads) and
    the process groups torch knows of, besides the default one."""
    import torch.distributed as dist

    return len(os.listdir("/proc/self/task")), len(dist.distributed_c10d._world.pg_map) - 1


def _trainer_model():
    """The trainer's model, DDP and optimizer (their reference cycles hold process groups)."""
    from trainer_steps import COMMON, build

    build(COMMON, 2)


def test_a_pooled_rank_keeps_no_process_group_of_an_earlier_call():
    """Each call's layout makes megatron's dozens of groups; megatron's teardown only forgets them,
    and the trainer's objects keep them alive in reference cycles that an idle rank never collects.
    Left alive, every gloo group keeps its threads polling in the pooled rank: by the end of a CI
    run thousands of them, slowing every later test on the same cores."""
    before = run_distributed(_threads_and_groups, world_size=2, tp=2)
    run_distributed(_ranks_and_groups, world_size=2, tp=2)
    for _ in range(2):
        run_distributed(_trainer_model, world_size=2)
    after = run_distributed(_threads_and_groups, world_size=2, tp=2)
    assert after == before, (before, after)  # per rank: (threads, groups) inside a call
    assert all(groups > 0 for _, groups in after)  # (a call's own layout made some)


def test_run_distributed_rejects_impossible_layout():
    with pytest.raises(ValueError, match="not divisible by tp\\*pp\\*cp"):
        run_distributed(_ranks_and_groups, world_size=2, tp=4)
