#!/usr/bin/env bash
# raypack's own path on one GPU, offline: install the wheelhouse, then train, time and score (scripts/gpu_run.py).
# Run from the repository root; the JSON is rewritten after each part, so a stopped run keeps what it measured.
#
#   bash scripts/gpu_run.sh --out $OUT/gpu_run.json                        # GPU host: bundle out/wheelhouse/all
#   bash scripts/gpu_run.sh --wheelhouse DIR --target /tmp/rp --out F.json # another bundle folder / install folder
#   bash scripts/gpu_run.sh --dry-run --out /tmp/gpu_run.json              # CPU: tiny model, the repo's .venv
#
# On the GPU host (python3 with torch, no network): `python3 -m pip install --no-index --no-deps --target`
# the bundle's wheels (scripts/wheelhouse.py made them), then PYTHONPATH=<repo>:<target>: raypack runs from the
# working tree. The dry run installs nothing and uses .venv/bin/python (or $PYTHON); it hides MLflow and Ray's
# dashboard extras (aiohttp_cors, opencensus) behind modules that refuse to import, as on the host, where they
# are absent: tracking off must import nothing of MLflow, and a local Ray must start without the dashboard.
# Every other argument goes to scripts/gpu_run.py (--arms, --work-dir).
set -euo pipefail
cd "$(dirname "$0")/.."
dry_run=0 wheelhouse=out/wheelhouse/all target=/tmp/raypack-site out="${OUT:-out}/gpu_run.json" rest=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --wheelhouse) wheelhouse="$2"; shift ;;
    --target) target="$2"; shift ;;
    --out) out="$2"; shift ;;
    *) rest+=("$1") ;;
  esac
  shift
done
export RAYPACK_TRACKING=0 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 \
  TOKENIZERS_PARALLELISM=false
unset RAY_ADDRESS
if [ "$dry_run" = 1 ]; then
  python="${PYTHON:-.venv/bin/python}"
  hidden=$(mktemp -d)
  trap 'rm -rf "$hidden"' EXIT
  for module in mlflow aiohttp_cors opencensus; do
    mkdir -p "$hidden/$module"
    # ModuleNotFoundError, as for a module that is not there: Ray's dashboard skips modules on that one only.
    echo "raise ModuleNotFoundError('$module is hidden by scripts/gpu_run.sh --dry-run: the GPU host has none'," \
      "name='$module')" > "$hidden/$module/__init__.py"
  done
  export PYTHONPATH="$hidden:$PWD"
  exec "$python" scripts/gpu_run.py --dry-run --out "$out" ${rest[@]+"${rest[@]}"}
fi
python="${PYTHON:-python3}"
shopt -s nullglob
wheels=("$wheelhouse"/*.whl)
[ ${#wheels[@]} -gt 0 ] || { echo "gpu_run.sh: no wheels in $wheelhouse; build them with scripts/wheelhouse.py" >&2; exit 2; }
start=$(date +%s.%N)
rm -rf "$target"
"$python" -m pip install --disable-pip-version-check --no-index --no-deps --quiet --target "$target" "${wheels[@]}"
install_s=$("$python" -c 'import sys, time; print(round(time.time() - float(sys.argv[1]), 1))' "$start")
echo "gpu_run.sh: ${#wheels[@]} wheels installed into $target in ${install_s} s" >&2
export PYTHONPATH="$PWD:$target"
export PATH="$target/bin:$PATH"  # Ray's own commands, should anything call them
exec "$python" scripts/gpu_run.py --out "$out" --install-seconds "$install_s" ${rest[@]+"${rest[@]}"}
