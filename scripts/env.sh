#!/usr/bin/env bash
# Set up (once) and use the project's virtual environment, then run a command inside it.
#
#   bash scripts/env.sh fg-train                  # install fg-bus, then train the built-in default
#   bash scripts/env.sh --dev python -m pytest -n 2   # also install the dev, hf, gpu and tracker extras, then run the tests
#
# Creates .venv with the first python3.11 / python3 found (override with PYTHON=...). Installs the CPU
# build torch==2.13.0 only when the environment has no torch yet: an existing (CUDA) torch is kept.
# Set FG_VENV to use another environment directory.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FG_VENV:-$root/.venv}"
extras=""
if [ "${1:-}" = "--dev" ]; then
    extras="[dev,hf,gpu,mlflow,wandb,trackio]"
    shift
fi

python="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x "$venv/bin/python" ]; then
    echo "env.sh: creating $venv with $python" >&2
    "$python" -m venv "$venv"
fi
vpy="$venv/bin/python"
"$vpy" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' 2>/dev/null || {
    echo "env.sh: $venv runs Python $("$vpy" -V 2>&1), fg-bus needs 3.11 or newer; remove it or set PYTHON" >&2
    exit 1
}

stamp="$venv/.fg-installed$extras"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
    if ! "$vpy" -c 'import torch' 2>/dev/null; then
        echo "env.sh: installing the CPU build of torch (torch==2.13.0)" >&2
        "$vpy" -m pip install --quiet "torch==2.13.0"
    fi
    echo "env.sh: installing fg-bus$extras (editable) into $venv" >&2
    "$vpy" -m pip install --quiet -e "$root$extras"
    touch "$stamp"
fi

if [ $# -eq 0 ]; then
    exit 0
fi
export PATH="$venv/bin:$PATH"
exec "$@"
