#!/usr/bin/env bash
# On the GPU machine (no package index there): install the carried wheels and put them first on
# PYTHONPATH. Source it:   source scripts/gpu/setup_env.sh
#
# Expects .whl/ (../shared/tools/device-wheels.sh [extra specs]: megatron-core, webdataset, ...,
# fla-core, flash-linear-attention) and, optionally, Triton carried in parts to /tmp/carry/triton
# (../shared/tools/device-carry.sh --pip triton triton==3.9.0: flash-linear-attention 0.6 refuses
# Triton < 3.7.1 on Hopper, and the machine's image has 3.6). Installs into /tmp/site; the checkout
# itself needs no install (PYTHONPATH makes `multimodal_dev` and `megatron.mcore_ext` importable).
set -e
if compgen -G "/tmp/carry/triton/part*" > /dev/null; then
  whl=/tmp/triton-3.9.0-cp312-abi3-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl
  [ -f "$whl" ] || cat /tmp/carry/triton/part* > "$whl"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/tsite "$whl"
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
# fla's compiled kernels from an earlier lease, if carried (scripts/gpu/triton_cache.sh)
bash scripts/gpu/triton_cache.sh unpack
export PYTHONPATH=/tmp/tsite:/tmp/site:$PWD:$PWD/examples
export PYTHONUNBUFFERED=1
set +e
python3 -c "import torch, triton, megatron.core; print('torch', torch.__version__, 'triton', triton.__version__, 'megatron-core', megatron.core.__version__)"
python3 -c "from megatron.mcore_ext.gdn import fla_usable; print('fla:', fla_usable() or 'usable')"
