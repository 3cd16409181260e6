"""Rank 0's log keeps our extensions' INFO notices (which kernels and layouts were chosen, CUDA
graph captures) while megatron-core's own INFO chatter stays at WARNING."""
from __future__ import annotations

import logging
from types import SimpleNamespace

from multimodal_dev.startup import setup_logging


def test_mcore_ext_info_kept_megatron_core_info_dropped(capsys):
    root = logging.getLogger()
    saved = (list(root.handlers), root.level,
             {n: logging.getLogger(n).level for n in ("megatron", "megatron.mcore_ext", "torch.distributed")})
    try:
        setup_logging(SimpleNamespace(log_dir=None), rank=0)
        logging.getLogger("megatron.mcore_ext.experts").info("ours-info")
        logging.getLogger("megatron.core.transformer").info("core-info")
        logging.getLogger("megatron.core.transformer").warning("core-warning")
        err = capsys.readouterr().err
        assert "ours-info" in err and "core-warning" in err
        assert "core-info" not in err
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
        for n, level in saved[2].items():
            logging.getLogger(n).setLevel(level)
