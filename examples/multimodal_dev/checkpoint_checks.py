"""What a checkpoint must agree on with this run's flags before it is loaded.

Both checks read only the checkpoint's common state and the flags, so they run before the model
is built (``checkpointing.open_checkpoint``): a wrong resume costs seconds, not a model build.

* The learning-rate schedule (``check_scheduler``): megatron-core's scheduler silently keeps the
  checkpoint's values; continuing a 150-iteration run with ``--train-iters 300`` then decays to
  the old horizon and trains the new iterations at learning rate 0. A difference is refused with
  both values and the two flags that resolve it. ``schedule_from_flags`` is the one place the
  schedule is derived from the flags (the trainer builds its scheduler from it too).
* The run settings (``check_settings``): a checkpoint of another model (architecture, variant,
  router scoring, expert bias) is refused, so is another ``--seed``; changed training
  coefficients are warned about. The flag and both values are named. A flag left unset means the architecture's value,
  known only once the model's config exists: those are compared by ``check_resolved`` after the
  model is built and before any weight is read (the checkpoint records ``resolved_settings``).

* The frozen parts (``check_frozen_parts``): a resume may freeze more than the run that saved, not
  less (the checkpoint holds no optimizer state for a part it did not train).

The optimizer's parameter groups are not compared: a checkpoint stores its state per parameter
(``checkpointing``, format 2) and takes the groups' settings from the loading run, which are the
schedule's anyway.
"""
from __future__ import annotations

import logging
from typing import Optional

from multimodal_dev.freezing import FLAGS as FREEZE_FLAGS
from multimodal_dev.models.contract import SetupError

__all__ = ["CheckpointError", "schedule_from_flags", "scheduler_policy", "check_scheduler", "check_settings",
           "check_frozen_parts", "check_resolved", "resolved_settings", "RESOLVED_FIELDS"]

log = logging.getLogger(__name__)


class CheckpointError(SetupError):
    """A checkpoint that cannot be used as asked (the message says why and what resolves it)."""


def schedule_from_flags(o) -> dict:
    """``OptimizerParamScheduler``'s keyword arguments from ``RunConfig.optimizer``; the keys it
    shares with the scheduler's ``state_dict()`` are what a checkpoint is checked against."""
    return dict(
        init_lr=0.0 if o.warmup_iters else o.lr,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_iters,
        lr_decay_steps=o.decay_iters,
        lr_decay_style=o.decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=o.decay_iters,
        wd_incr_style="constant",
        # a checkpoint's schedule that differs from the flags is refused before this is consulted
        # (check_scheduler); these two say which side wins when the user allows a difference
        override_opt_param_scheduler=o.override_scheduler,
        use_checkpoint_opt_param_scheduler=not o.override_scheduler,
    )


# scheduler state key -> (what it is, the flag that sets it)
_SCHEDULE_FIELDS = {
    "max_lr": ("peak learning rate", "--lr"),
    "min_lr": ("minimum learning rate", "--min-lr"),
    "lr_warmup_steps": ("warm-up iterations", "--lr-warmup-iters"),
    "lr_decay_steps": ("decay iterations", "--lr-decay-iters (default: --train-iters)"),
    "lr_decay_style": ("decay style", "--lr-decay-style"),
    "start_wd": ("weight decay", "--weight-decay"),
    "end_wd": ("weight decay", "--weight-decay"),
}


def scheduler_policy(optimizer_args) -> str:
    """"flags" (--override-opt-param-scheduler), "checkpoint" (--use-checkpoint-opt-param-scheduler)
    or "refuse" (neither: a difference between the two is an error)."""
    if optimizer_args.override_scheduler:
        return "flags"
    return "checkpoint" if optimizer_args.use_checkpoint_scheduler else "refuse"


def check_scheduler(saved: dict, schedule: dict, policy: str, path: str) -> None:
    """Refuse (``policy`` "refuse") a checkpoint whose schedule ``saved`` (the scheduler's state
    dict) differs from ``schedule`` (``schedule_from_flags``)."""
    if policy != "refuse":
        return
    diff = [(k, saved[k], schedule[k]) for k in _SCHEDULE_FIELDS if k in saved and saved[k] != schedule[k]]
    if diff:
        seen, lines = set(), []
        for k, a, b in diff:
            what, flag = _SCHEDULE_FIELDS[k]
            if flag not in seen:  # start_wd and end_wd are one flag
                seen.add(flag)
                lines.append(f"{what} ({flag}): checkpoint {a!r}, flags {b!r}")
        raise CheckpointError(
            f"--load {path}: the checkpoint's learning-rate schedule differs from the flags: {'; '.join(lines)}. "
            "Pass --override-opt-param-scheduler to continue with the flags' schedule, or "
            "--use-checkpoint-opt-param-scheduler to keep the checkpoint's"
        )


# run settings: (path in RunConfig.to_dict(), the TransformerConfig field it resolves to, the flag).
# The first group defines the model (a difference is refused), the second steers training (warned).
_MODEL_SETTINGS = (
    (("model", "arch"), None, "--model-arch"),
    (("model", "variant"), None, "--variant"),
    (("model", "moe", "score_function"), "moe_router_score_function", "--moe-router-score-function"),
    (("model", "moe", "enable_expert_bias"), "moe_router_enable_expert_bias", "--moe-router-enable-expert-bias"),
)
_TRAINING_SETTINGS = (
    (("model", "moe", "aux_loss_coeff"), "moe_aux_loss_coeff", "--moe-aux-loss-coeff"),
    (("model", "moe", "z_loss_coeff"), "moe_z_loss_coeff", "--moe-z-loss-coeff"),
    (("model", "moe", "load_balancing_type"), "moe_router_load_balancing_type", "--moe-router-load-balancing-type"),
)
# the model's sizes (from --variant or --hf-checkpoint's config.json): refused when they differ
_SIZE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
                "num_moe_experts", "moe_ffn_hidden_size", "moe_router_topk", "moe_layer_freq",
                "experimental_attention_variant", "linear_attention_freq")
_SIZE_SETTINGS = tuple((None, f, f"the model's {f} (--variant / --hf-checkpoint)") for f in _SIZE_FIELDS)
RESOLVED_FIELDS = tuple(f for _, f, _ in _MODEL_SETTINGS + _TRAINING_SETTINGS + _SIZE_SETTINGS if f is not None)


def resolved_settings(config) -> dict:
    """The model's resolved values of the checked settings (a flag left unset takes the
    architecture's value): what a checkpoint records beside its flags."""
    return {f: getattr(config, f, None) for f in RESOLVED_FIELDS}


def _get(tree, path):
    for k in path:
        if not isinstance(tree, dict) or k not in tree:
            return KeyError
        tree = tree[k]
    return tree


def _refuse_model(path: str, refused: list[str]) -> None:
    raise CheckpointError(f"--load {path} was written for another model: " + "; ".join(refused)
                          + ". Use the checkpoint's values, or convert the checkpoint first")


def check_settings(saved: Optional[dict], now: dict, path: str, resume: bool = True) -> None:
    """Before the model is built: compare the flags the checkpoint was written with (``saved``)
    with this run's (``now``; both ``RunConfig.to_dict()``). A model setting given on both sides
    with different values is refused, and so is a changed ``--seed`` (the resumed data order and
    the per-rank RNG states follow from the seed the run started with). A flag left unset on one
    side (the architecture's value) is compared once its value is known (``check_resolved``).
    ``resume=False`` (a weights-only checkpoint: a new run starts from it): the model settings only."""
    if not isinstance(saved, dict) or "model" not in saved:
        return  # written before the settings were recorded in this form
    refused = []
    for keys, _, flag in _MODEL_SETTINGS:
        a, b = _get(saved, keys), _get(now, keys)
        if KeyError not in (a, b) and None not in (a, b) and a != b:
            refused.append(f"{flag}: checkpoint {a!r}, now {b!r}")
    if refused:
        _refuse_model(path, refused)
    if not resume:  # a run that starts from a weights-only checkpoint: its own seed, any frozen parts
        return
    a, b = _get(saved, ("seed",)), _get(now, ("seed",))
    if KeyError not in (a, b) and a != b:
        raise CheckpointError(f"--load {path}: --seed: checkpoint {a!r}, now {b!r}; a resumed run keeps the seed it "
                              "started with (its data order and RNG states follow from it)")
    check_frozen_parts(saved, now, path)


def check_frozen_parts(saved: dict, now: dict, path: str) -> None:
    """Refuse a resume that trains a part the checkpoint's run froze (``--freeze-*``): the
    checkpoint has its weights but no optimizer state for it. Freezing more is fine: the
    checkpoint's optimizer state of the newly frozen parameters is simply not read."""
    was, new = (set(x) if isinstance(x, (list, tuple)) else set() for x in (_get(saved, ("model", "freeze")),
                                                                              _get(now, ("model", "freeze"))))
    thawed = [FREEZE_FLAGS[p] for p in FREEZE_FLAGS if p in was - new]
    if thawed:
        raise CheckpointError(f"--load {path} was written with {' '.join(thawed)}: it holds no optimizer state for "
                              "what this run would train. Resume with the same --freeze-* flags (or more)")
    if new - was:
        log.info("--load %s: %s now frozen; the checkpoint's optimizer state for it is not read", path,
                 " ".join(FREEZE_FLAGS[p] for p in FREEZE_FLAGS if p in new - was))


def check_resolved(saved: Optional[dict], config, path: str) -> None:
    """Once the model is built, before its weights are read: compare the checkpoint's resolved
    settings (``resolved_settings`` at save) with this model's ``config``."""
    if not isinstance(saved, dict):
        return
    now = resolved_settings(config)
    refused = []
    for _, field, flag in _MODEL_SETTINGS + _SIZE_SETTINGS + _TRAINING_SETTINGS:
        if field is None or field not in saved or saved[field] == now[field]:
            continue
        if any(field == f for _, f, _ in _MODEL_SETTINGS + _SIZE_SETTINGS):
            refused.append(f"{flag}: checkpoint {saved[field]!r}, now {now[field]!r}")
        else:
            log.warning("--load %s: %s differs (checkpoint %r, now %r); continuing with the flag's value",
                        path, flag, saved[field], now[field])
    if refused:
        _refuse_model(path, refused)
