"""``BatchedGradDDP`` (megatron/mcore_ext/ddp.py) against megatron-core's own DDP on a small MoE GPT
(world size 1, CPU, fp32): the same ``main_grad`` buffers, bit for bit, over two iterations, also
when a backward raised halfway in between (its gradients must not leak into the next iteration,
and its queued-flush bookkeeping must not stop later backwards from flushing)."""
import pytest
import torch

from megatron.mcore_ext.testing import run_distributed

V = 64


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (2, 16), generator=g)
    labels = torch.randint(0, V, (2, 16), generator=g)
    return tokens, labels


def _run(batched: bool, fail_in_between: bool):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron.mcore_ext.ddp import BatchedGradDDP
    from megatron.mcore_ext.testing import tiny_moe_gpt

    MoEAuxLossAutoScaler.main_loss_backward_scale = torch.tensor(1.0)
    torch.manual_seed(0)
    model = tiny_moe_gpt(num_layers=2, vocab_size=V)
    cls = BatchedGradDDP if batched else DistributedDataParallel
    ddp = cls(config=model.config, ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True),
              module=model)
    pos = torch.arange(16)[None].expand(2, 16)

    def backward(seed, fail=False):
        tokens, labels = _inputs(seed)
        loss = ddp(tokens, pos, None, labels=labels).sum()
        if fail:  # raise halfway through the backward, after some parameters got their gradient
            hidden = ddp.module.decoder.layers[0].mlp.router.weight
            hidden.register_hook(lambda g: (_ for _ in ()).throw(RuntimeError("planted")))
        loss.backward()

    snapshots = []
    for it, seed in enumerate((1, 2)):
        ddp.zero_grad_buffer()
        if fail_in_between and it == 1:
            with pytest.raises(RuntimeError, match="planted"):
                backward(99, fail=True)
            ddp.zero_grad_buffer()  # what a training loop that survives the error does next
            model.decoder.layers[0].mlp.router.weight._backward_hooks = None
        backward(seed)
        backward(seed + 10)  # two micro-batches
        snapshots.append({n: p.main_grad.clone() for n, p in model.named_parameters()})
    return type(ddp).__name__, snapshots


@pytest.mark.parametrize("fail_in_between", [False, True], ids=["plain", "after_a_failed_backward"])
def test_batched_ddp_buffers_equal_megatron_ddp(fail_in_between):
    name, ours = run_distributed(_run, 1, args=(True, fail_in_between))[0]
    ref_name, ref = run_distributed(_run, 1, args=(False, False))[0]
    assert (name, ref_name) == ("BatchedGradDDP", "DistributedDataParallel")
    for it, (a, b) in enumerate(zip(ours, ref)):
        assert a.keys() == b.keys()
        for n in b:
            assert torch.equal(a[n], b[n]), f"iteration {it}: main_grad {n} differs"
        assert any(t.abs().sum() > 0 for t in a.values())
