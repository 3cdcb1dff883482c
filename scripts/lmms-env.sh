#!/usr/bin/env bash
# Build (or reuse) the virtualenv the lmms-eval plugin test runs in, and print its python as the last line.
#
#   LMMS_EVAL_PYTHON="$(scripts/lmms-env.sh | tail -n 1)" python -m pytest tests/test_evaluate.py -k lmms_eval_plugin
#
# Layered: the project's own environment (torch==2.13.0, this package with its test extras, as .ci/run builds
# .venv), then lmms-eval 0.7.3 with --no-deps, then only the packages it imports, each pinned by
# scripts/lmms-constraints.txt (every package of the layer and their dependencies, as resolved once on this
# machine). lmms-eval's own metadata would pull wandb, an unpinned torchvision (built for another torch: it
# breaks `import transformers`) and about 100 other packages; it needs numpy>=1.26.4, which the project's
# numpy already is. filelock<4: lmms-eval 0.7.3 imports filelock._api, which filelock 4 removed.
#
# Cached: the environment is reused when the marker holds the hash of this script, the constraints, the
# python version and pyproject.toml; a second run takes seconds. The project install is editable, redone
# (seconds) when the checkout path changes.
#
# Environment variables: LMMS_ENV (default ~/.cache/recipe-compiler/lmms-env), PYTHON (default python3).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
ENV_DIR="${LMMS_ENV:-${XDG_CACHE_HOME:-$HOME/.cache}/recipe-compiler/lmms-env}"
CONSTRAINTS="$ROOT/scripts/lmms-constraints.txt"
TORCH_PIN="torch==2.13.0"   # the CPU wheel on local disk; without the pin pip would pull a CUDA torch
LMMS_PIN="lmms-eval==0.7.3"
# What lmms-eval 0.7.3 imports on the path the plugin test takes (versions: the constraints file).
LAYER=(accelerate loguru sacrebleu portalocker tabulate colorama lxml evaluate datasets multiprocess dill xxhash
       pandas python-dateutil pytz tzdata six pyarrow requests urllib3 certifi charset-normalizer psutil tenacity
       aiohttp multidict attrs yarl propcache aiohappyeyeballs aiosignal frozenlist pytablewriter "filelock<4")

inputs_hash="$( { cat "${BASH_SOURCE[0]}" "$CONSTRAINTS" "$ROOT/pyproject.toml"; "$PY" -c 'import sys; print(sys.version)'; } | sha256sum | cut -c1-16)"
marker="$ENV_DIR/.recipe-compiler-env-$inputs_hash"
project_marker="$ENV_DIR/.recipe-compiler-project"
project_key="$ROOT"

mkdir -p "$(dirname "$ENV_DIR")"
exec 9>"$ENV_DIR.lock"
flock 9  # two builds at once would corrupt each other

log() { echo "lmms-env: $*" >&2; }

if [[ -f "$marker" && -x "$ENV_DIR/bin/python" ]]; then
    log "reusing $ENV_DIR (inputs $inputs_hash)"
else
    start=$SECONDS
    log "building $ENV_DIR from nothing (inputs $inputs_hash)"
    rm -rf "$ENV_DIR"
    "$PY" -m venv "$ENV_DIR"
    pip=("$ENV_DIR/bin/python" -m pip --quiet)
    "${pip[@]}" install --upgrade pip
    "${pip[@]}" install "$TORCH_PIN"
    "${pip[@]}" install -c "$CONSTRAINTS" -e "$ROOT[test]"       # the project's environment
    "${pip[@]}" install --no-deps "$LMMS_PIN"                     # lmms-eval without its pins
    "${pip[@]}" install -c "$CONSTRAINTS" "${LAYER[@]}"           # what it imports, pinned
    "$ENV_DIR/bin/python" -m pip check >&2 || log "pip check reports the requirements lmms-eval's metadata names but --no-deps skipped (expected)"
    "$ENV_DIR/bin/python" -c 'import lmms_eval, torch, transformers, numpy; from lmms_eval.__main__ import cli_evaluate; print("lmms-eval imports; torch", torch.__version__, "transformers", transformers.__version__, "numpy", numpy.__version__)' >&2
    echo "$ROOT" > "$project_marker"
    touch "$marker"
    log "built in $((SECONDS - start)) s"
fi

if [[ "$(cat "$project_marker" 2>/dev/null)" != "$project_key" ]]; then
    "$ENV_DIR/bin/python" -m pip --quiet install --no-deps --no-build-isolation -e "$ROOT"
    echo "$project_key" > "$project_marker"
    log "installed $ROOT into it (editable, --no-deps)"
fi
echo "$ENV_DIR/bin/python"
