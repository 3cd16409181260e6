"""Data: the collate (``pack_or_pad_batch``) and, later, the dataset providers."""
from multimodal_dev.data.collate import (  # noqa: F401
    IGNORE_INDEX,
    CollateConfig,
    mrope_position_ids,
    pack_or_pad_batch,
    required_seq_multiple,
)
