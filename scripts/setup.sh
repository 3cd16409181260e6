#!/usr/bin/env bash
# Set up multimodal_dev in ./.venv. Idempotent: a second run with nothing changed installs nothing.
#
#   bash scripts/setup.sh          # the stack (megatron-core 0.19.2, torch, data libraries)
#   bash scripts/setup.sh --test   # the same plus the test tools (pytest, hypothesis)
#
# * Finds a Python >= 3.12 (megatron-core 0.19.2 needs it): $MMDEV_PYTHON if set, else python3 if
#   new enough, else python3.12 / python3.13 on PATH, else the newest pyenv 3.12 (then 3.13).
# * If that Python already imports torch and megatron.core (an NGC container), the venv sees the
#   system packages and nothing but this project itself is installed (no torch, no megatron-core).
# * Transformer Engine and apex are never installed: they are optional accelerators.
set -euo pipefail
cd "$(dirname "$0")/.."
want_test=0
for a in "$@"; do
  case "$a" in
    --test) want_test=1 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown argument '$a' (expected --test or nothing)" >&2; exit 2 ;;
  esac
done

py_ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; }

find_python() {
  if [ -n "${MMDEV_PYTHON:-}" ]; then
    py_ok "$MMDEV_PYTHON" || { echo "setup.sh: MMDEV_PYTHON=$MMDEV_PYTHON is not a Python >= 3.12" >&2; exit 1; }
    echo "$MMDEV_PYTHON"; return
  fi
  local c
  for c in python3 python3.12 python3.13; do
    if command -v "$c" >/dev/null && py_ok "$(command -v "$c")"; then command -v "$c"; return; fi
  done
  # prefer 3.12 (what megatron-core 0.19.2 and this project are tested with), then 3.13
  for c in $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12.* 2>/dev/null | sort -V -r) \
           $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.13.* 2>/dev/null | sort -V -r); do
    if py_ok "$c/bin/python3"; then echo "$c/bin/python3"; return; fi
  done
  echo "setup.sh: no Python >= 3.12 found (megatron-core 0.19.2 needs one); set MMDEV_PYTHON" >&2
  exit 1
}

PY=$(find_python)
has_stack=0
"$PY" -c 'import torch, megatron.core' 2>/dev/null && has_stack=1

if [ -x .venv/bin/python ] && ! py_ok .venv/bin/python; then
  echo "setup.sh: .venv has a Python older than 3.12; recreating it"
  rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
  if [ "$has_stack" = 1 ]; then
    echo "setup.sh: $PY already has torch and megatron-core: the venv uses them (--system-site-packages)"
    "$PY" -m venv --system-site-packages .venv
  else
    echo "setup.sh: creating .venv with $PY ($("$PY" --version))"
    "$PY" -m venv .venv
  fi
fi

system_site=$(grep -c '^include-system-site-packages = true' .venv/pyvenv.cfg || true)
stamp_key="$(cat setup.py | sha256sum | cut -c1-16)-test$want_test-sys$system_site"
stamp=.venv/.mmdev-setup-stamp
if [ -f "$stamp" ] && grep -qx "$stamp_key" "$stamp" 2>/dev/null \
   && .venv/bin/python -c 'import multimodal_dev, megatron.mcore_ext, megatron.core' 2>/dev/null; then
  echo "setup.sh: .venv is up to date"
  exit 0
fi

pip_q=(-q --disable-pip-version-check)
# This machine image's pip.conf lists local indexes that lack most packages; pip warns once per
# package. Keep real errors, drop that noise.
quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; return "${PIPESTATUS[0]}"; }
if [ "$system_site" = 1 ]; then
  # NGC-style environment: install the project only; its dependencies are already there.
  quiet .venv/bin/python -m pip install "${pip_q[@]}" --no-deps --no-build-isolation -e .
  if [ "$want_test" = 1 ]; then
    for m in pytest hypothesis; do
      .venv/bin/python -c "import $m" 2>/dev/null || quiet .venv/bin/python -m pip install "${pip_q[@]}" "$m"
    done
  fi
  .venv/bin/python -c 'import megatron.core as m; v = m.__version__
if v.split("+")[0] != "0.19.2": print(f"setup.sh: warning: this environment has megatron-core {v}; the project is tested with 0.19.2")'
else
  extra=""
  [ "$want_test" = 1 ] && extra="[test]"
  echo "setup.sh: installing the project and its dependencies into .venv (first time: torch is large)"
  quiet .venv/bin/python -m pip install "${pip_q[@]}" -e ".$extra"
fi
.venv/bin/python -c 'import multimodal_dev, megatron.mcore_ext, megatron.core, torch
print(f"setup.sh: ready: torch {torch.__version__}, megatron-core {megatron.core.__version__}")'
echo "$stamp_key" > "$stamp"
