"""Models: the registry, the trainer <-> builder contract, the architecture-agnostic pieces
(``MultimodalModel``, the decoder spec builder) and one sub-package per architecture."""
from multimodal_dev.models.base import MultimodalModel, packed_seq_params_from_batch  # noqa: F401
from multimodal_dev.models.contract import BuildOptions, DataSpec, MoEOptions  # noqa: F401
from multimodal_dev.models.registry import (  # noqa: F401
    available_architectures,
    build_model,
    build_model_from_hf,
    get_architecture,
    load_plugin,
    register_architecture,
)
