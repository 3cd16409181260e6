"""Test plugin (``pretrain_multimodal.py --plugin tests/plugins/group_step_adam.py``): megatron-core
builds its Adam from a CPU stand-in that keeps the optimizer state the way Transformer Engine's
(and apex's) ``FusedAdam`` does, for ``tests/unit/test_faults.py``; the product code has no hook.

What it copies from ``transformer_engine/pytorch/optimizers/fused_adam.py`` (2.20.2), the optimizer
megatron-core 0.19.2 builds whenever TE is importable (``megatron/core/optimizer/__init__.py``):

* the Adam step is one int per parameter group (``group["step"]``, created at the first step), not
  a per-parameter ``state["step"]`` as in torch's Adam -- so megatron's plain optimizer stores no
  ``common_step`` for it;
* the per-parameter state is ``exp_avg`` / ``exp_avg_sq`` only, and ``load_state_dict`` refuses any
  other name with ``KeyError(name)`` (TE looks each name up in its dtype map);
* the step must be an int (TE's kernel takes one): a float step raises ``TypeError`` here.

The update is AdamW's (``adam_w_mode``, megatron's default) in fp32, so runs with it train as with
torch's AdamW; TE's kernel itself is not modelled.
"""
import torch
from megatron.core import optimizer as mcore_optimizer

_STATE_NAMES = ("exp_avg", "exp_avg_sq", "master_param")


class GroupStepAdam(torch.optim.Optimizer):
    """Adam(W) with the step per parameter group, as TE's FusedAdam keeps it."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, adam_w_mode=True,
                 capturable=False, bias_correction=True):
        if capturable:
            raise ValueError("group_step_adam: capturable (optimizer CUDA graphs) is not modelled")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      adam_w_mode=adam_w_mode, bias_correction=bias_correction))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            step = group.get("step", 0)
            if type(step) is not int:  # TE's multi_tensor_adam kernel takes the step as an int
                raise TypeError(f"group_step_adam: a parameter group's step is {step!r}, not an int")
            group["step"] = step + 1  # TE advances it for empty groups too
            beta1, beta2 = group["betas"]
            t = group["step"]
            c1, c2 = (1 - beta1 ** t, 1 - beta2 ** t) if group["bias_correction"] else (1.0, 1.0)
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if "exp_avg" not in st:
                    st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                g = p.grad
                if not group["adam_w_mode"] and group["weight_decay"]:
                    g = g.add(p, alpha=group["weight_decay"])
                st["exp_avg"].mul_(beta1).add_(g, alpha=1 - beta1)
                st["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                if group["adam_w_mode"] and group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                denom = (st["exp_avg_sq"] / c2).sqrt_().add_(group["eps"])
                p.addcdiv_(st["exp_avg"], denom, value=-group["lr"] / c1)
        return loss

    def load_state_dict(self, state_dict):
        for name in {n for s in state_dict["state"].values() for n in s}:
            if name not in _STATE_NAMES:
                raise KeyError(name)  # what TE's set_scaled_state raises for "step"
        super().load_state_dict(state_dict)


mcore_optimizer.Adam = GroupStepAdam
mcore_optimizer.USING_PYTORCH_OPTIMIZER = False
print("group_step_adam: megatron's Adam is the FusedAdam-style CPU stand-in", flush=True)
