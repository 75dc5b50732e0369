#!/usr/bin/env bash
# The device check (benchmarks/README.md, "Device check"): on a bare accelerator machine without network,
# install the carried wheels and this project, then run benchmarks/device_check.py check (devices, paper-size
# benchmarks in float32 and bfloat16, a time-boxed slice of a paper run with 1 and 5 seeds; <= 8 minutes).
#
#   bash benchmarks/device_check.sh [OUT_DIR] [--tiny] [--no-install] [--wheels DIR] [--budget-s S] [--parts a,b]
#                                    [--part-limit-s S] [--runs-dir DIR]
#
# OUT_DIR defaults to $OUT (the device tool's folder that comes back), else ./device_check_out. --no-install
# skips the install (the environment already has envpool, tensorboardX and the project's other needs).
# PYTHON picks the interpreter (default python3). Exit status: 0 when every part that finished succeeded.
set -uo pipefail
cd "$(dirname "$0")/.."

out="${OUT:-device_check_out}"
wheels="wheels"
install=1
check_args=()
while (($#)); do
  case "$1" in
    --tiny) check_args+=(--tiny) ;;
    --no-install) install=0 ;;
    --wheels) wheels="$2"; shift ;;
    --budget-s|--parts|--part-limit-s|--runs-dir) check_args+=("$1" "$2"); shift ;;
    -*) echo "error: unknown option $1" >&2; exit 2 ;;
    *) out="$1" ;;
  esac
  shift
done
python="${PYTHON:-python3}"
mkdir -p "$out"

if ((install)); then
  # Wheels only, never the network: the carried dependency wheels into their own folder (--target keeps the
  # image's packages, jax, flax, ..., untouched), then this tree, built in place with the image's setuptools. If
  # that build is not possible offline, the tree runs from PYTHONPATH: the code is the same either way.
  site="${DEVICE_CHECK_SITE:-/tmp/dlwm_site}"
  log="$out/install.log"
  shopt -s nullglob
  carried=("$wheels"/*.whl)
  if ((${#carried[@]} == 0)); then
    echo "error: no wheels in $wheels (make wheels prepares them)" >&2; exit 2
  fi
  start=$(date +%s)
  "$python" -m pip install --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
      "${carried[@]}" >"$log" 2>&1 || { echo "error: installing the wheels in $wheels failed (see $log)" >&2; exit 2; }
  if "$python" -m pip install --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
      --target "$site" . >>"$log" 2>&1; then
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    echo "[device_check] installed ${#carried[@]} wheels and the project into $site in $(( $(date +%s) - start )) s"
  else
    export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    echo "[device_check] installed ${#carried[@]} wheels into $site in $(( $(date +%s) - start )) s; the project" \
         "could not be built offline here (see $log), so it runs from the tree on PYTHONPATH"
  fi
fi

exec "$python" benchmarks/device_check.py check --out "$out" "${check_args[@]}"
