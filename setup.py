"""multimodal_dev: a Megatron-Core training stack for MoE vision-language models.

Two things are installed:
* ``multimodal_dev`` -- the example (``examples/multimodal_dev``): data, models, training.
* ``megatron.mcore_ext`` -- our model-agnostic additions to Megatron-Core (CPU runtime,
  context-parallel index helpers, ...). ``megatron`` is a PEP 420 namespace that the
  installed megatron-core also fills, so there is deliberately no ``megatron/__init__.py``.
"""
from setuptools import find_namespace_packages, find_packages, setup

ext_packages = find_namespace_packages(include=["megatron.mcore_ext", "megatron.mcore_ext.*"])
example_packages = ["multimodal_dev"] + [
    f"multimodal_dev.{p}" for p in find_packages(where="examples/multimodal_dev")
]

setup(
    name="multimodal-dev",
    version="0.1.0",
    description="Megatron-Core training stack for mixture-of-experts vision-language models",
    python_requires=">=3.12",
    packages=ext_packages + example_packages,
    package_dir={"multimodal_dev": "examples/multimodal_dev"},
    install_requires=[
        "megatron-core==0.19.2",
        "torch>=2.6",  # tested with 2.14.1 (CPU) and 2.11 (CUDA 13)
        "numpy",
        "pillow",
        "pyyaml",
        "webdataset",
        "tokenizers",  # the data's tokenizer (a local tokenizer.json; nothing is downloaded)
        "tensorboard",  # --tensorboard-dir
        "tqdm",  # the progress bar
        "psutil",  # megatron-core's checkpoint writer workers need it
    ],
    package_data={"multimodal_dev.data": ["assets/*.json"]},
    extras_require={
        # transformers: the HF Qwen3.5-MoE implementation is the numerical oracle of the model tests
        "test": ["pytest", "hypothesis", "transformers>=5.23,<6"],
    },
)
