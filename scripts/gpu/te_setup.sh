#!/usr/bin/env bash
# On the GPU machine, after scripts/gpu/setup_env.sh: install Transformer Engine 2.20.2 from carried
# files and put it first on PYTHONPATH. Source it:   source scripts/gpu/te_setup.sh
#
# Expects (see ../shared/tools/device-carry.sh's header):
#   /tmp/carry/te/part*  the core wheel transformer_engine_cu13-2.20.2 in parts (device-carry.sh --pip te ...)
#   .tewhl/              transformer_engine-2.20.2 (the Python package), its small dependencies, and either
#                        the source transformer_engine_torch-2.20.2.tar.gz (built here, ~2 min, 16 jobs) or
#                        a wheel of it built on such a machine before (transformer_engine_torch-*.whl[.partN]).
# The three TE wheels are *extracted* into one folder (/tmp/tesite): `pip install --target` skips a
# package folder that already exists, so the torch extension would be missing from transformer_engine/.
# A fresh build is also copied to $OUT in parts of 15 MB, to carry next time instead of building.
set -e
T=/tmp/tesite; mkdir -p "$T"
core=/tmp/transformer_engine_cu13-2.20.2-py3-none-manylinux_2_28_x86_64.whl
[ -f "$core" ] || cat /tmp/carry/te/part* > "$core"
python3 -m zipfile -e "$core" "$T"
python3 -m zipfile -e .tewhl/transformer_engine-2.20.2-py3-none-any.whl "$T"
ls .tewhl/*.whl | grep -v -e transformer_engine -e transformer-engine | \
  xargs python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site
# /tmp/site: the small wheels above (pydantic ...) -- also when run, not sourced (run_steps.sh)
export PYTHONPATH=$T:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
if compgen -G ".tewhl/transformer_engine_torch-*.whl.part*" > /dev/null; then
  cat .tewhl/transformer_engine_torch-*.whl.part* > /tmp/te_torch.whl
elif compgen -G ".tewhl/transformer_engine_torch-*.whl" > /dev/null; then
  cp .tewhl/transformer_engine_torch-*.whl /tmp/te_torch.whl
else
  t0=$(date +%s)
  rm -rf /tmp/tebuild && mkdir -p /tmp/tebuild && tar -xzf .tewhl/transformer_engine_torch-2.20.2.tar.gz -C /tmp/tebuild
  NVTE_PYTORCH_FORCE_BUILD=TRUE MAX_JOBS=16 NVTE_CUDA_ARCHS=90 python3 -m pip wheel -q --no-deps \
    --no-build-isolation --no-index -w /tmp/tewhl /tmp/tebuild/transformer_engine_torch-2.20.2 > /tmp/tebuild.log 2>&1 \
    || { tail -40 /tmp/tebuild.log; exit 1; }
  echo "built the TE torch extension in $(( $(date +%s) - t0 )) s"
  cp /tmp/tewhl/*.whl /tmp/te_torch.whl
  if [ -n "$OUT" ]; then
    name=$(basename /tmp/tewhl/*.whl)
    (cd "$OUT" && split -b 15m -d -a 1 /tmp/te_torch.whl "$name.part")
  fi
fi
python3 -m zipfile -e /tmp/te_torch.whl "$T"
set +e
python3 -c "import transformer_engine.pytorch as te, transformer_engine; print('transformer_engine', transformer_engine.__version__)"
