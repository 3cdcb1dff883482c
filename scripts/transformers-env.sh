#!/usr/bin/env bash
# Build (or reuse) a virtualenv with the newest transformers the package registry serves, and print its
# python as the last line. .ci/run runs the runtime's conformance subset there (see tests/README or .ci/run):
#
#   python="$(scripts/transformers-env.sh | tail -n 1)" && "$python" -m pytest -q tests/test_matrix.py -k ...
#
# Why: the project's tested range is pinned in pyproject.toml, but users upgrade transformers on their own
# schedule; this environment tells CI whether the newest release still runs the runtime bit-exactly.
# The project is installed editable with --no-deps, so the newest transformers is tested even when it lies
# outside the declared range (the import-time warning then says so, and the tests still run).
#
# Which release: TRANSFORMERS_VERSION when set (e.g. to check an older bound), else the newest of the four newest
# `pip index versions transformers` reports that installs here. The environment is cached per release: its marker holds the
# hash of this script, the python version and that release, so a second run takes seconds and a new
# release on the registry rebuilds it.
#
# Environment variables: TRANSFORMERS_VERSION, TRANSFORMERS_ENV (where the environment lives; default
# ~/.cache/recipe-compiler/transformers-env-<release>), PYTHON (the interpreter to build it from; default python3).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
TORCH_PIN="torch==2.13.0"   # the CPU wheel on local disk; without the pin pip would pull a CUDA torch

log() { echo "transformers-env: $*" >&2; }

env_dir_for() { echo "${TRANSFORMERS_ENV:-${XDG_CACHE_HOME:-$HOME/.cache}/recipe-compiler/transformers-env-$1}"; }
marker_for() {
    local hash
    hash="$( { cat "${BASH_SOURCE[0]}"; "$PY" -c 'import sys; print(sys.version)'; echo "$1"; } | sha256sum | cut -c1-16)"
    echo "$(env_dir_for "$1")/.recipe-compiler-env-$hash"
}

version="${TRANSFORMERS_VERSION:-}"
if [[ -z "$version" ]]; then
    # The newest release that installs here: a release can need a dependency this python or registry lacks
    # (5.25.0 needs kernels>=0.19.1, which requires Python 3.12); then the next older one is tested, and the
    # log says which and why. A release already built is taken without asking pip again.
    releases="$("$PY" -m pip index versions transformers 2>/dev/null | sed -n 's/^Available versions: //p' | tr -d ',')"
    [[ -n "$releases" ]] || { log "cannot ask the package registry for the newest transformers (pip index versions transformers failed)"; exit 2; }
    for candidate in $(echo "$releases" | tr ' ' '\n' | grep -E '^[0-9]+\.[0-9]+\.[0-9]+$' | head -n 4); do
        if [[ -f "$(marker_for "$candidate")" ]]; then
            version="$candidate"
            break
        fi
        if why="$("$PY" -m pip install --dry-run --quiet --ignore-installed "transformers==$candidate" "$TORCH_PIN" 2>&1 >/dev/null)"; then
            version="$candidate"
            break
        fi
        log "transformers $candidate cannot be installed here ($(echo "$why" | grep -v 'is ignored: it is neither' | grep ERROR | tail -n 1)); trying the release before it"
    done
    [[ -n "$version" ]] || { log "none of the four newest transformers releases installs here"; exit 2; }
fi
ENV_DIR="$(env_dir_for "$version")"
marker="$(marker_for "$version")"
inputs_hash="$(basename "$marker" | sed 's/^.recipe-compiler-env-//')"
project_marker="$ENV_DIR/.recipe-compiler-project"
project_key="$ROOT $(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"

mkdir -p "$(dirname "$ENV_DIR")"
exec 9>"$ENV_DIR.lock"
flock 9  # two builds at once would corrupt each other

if [[ -f "$marker" && -x "$ENV_DIR/bin/python" ]]; then
    log "reusing $ENV_DIR (transformers $version, inputs $inputs_hash)"
else
    start=$SECONDS
    log "building $ENV_DIR from nothing (transformers $version, inputs $inputs_hash)"
    rm -rf "$ENV_DIR"
    "$PY" -m venv "$ENV_DIR"
    pip=("$ENV_DIR/bin/python" -m pip --quiet)
    "${pip[@]}" install --upgrade pip
    "${pip[@]}" install "$TORCH_PIN"
    # The project's runtime and test dependencies (pyproject.toml) with transformers at the chosen release.
    "${pip[@]}" install -c <(echo "$TORCH_PIN") "transformers==$version" "safetensors>=0.4" "numpy>=1.26" \
        "scipy>=1.11" "pillow>=10" "tqdm>=4.66" "pytest>=8" "hypothesis>=6.100"
    "$ENV_DIR/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' >&2
    rm -f "$project_marker"
    touch "$marker"
    log "built in $((SECONDS - start)) s"
fi

if [[ "$(cat "$project_marker" 2>/dev/null)" != "$project_key" ]]; then
    # --no-deps: the declared range must not stop pip from testing a release outside it.
    "$ENV_DIR/bin/python" -m pip --quiet install --no-deps --no-build-isolation -e "$ROOT"
    echo "$project_key" > "$project_marker"
    log "installed $ROOT into it (editable, --no-deps)"
fi
echo "$ENV_DIR/bin/python"
