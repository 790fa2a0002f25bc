#!/usr/bin/env bash
# One-time set-up: a virtual environment in .venv with everything in requirements.txt.
# Safe to run again: an up-to-date environment is left as it is, in a second or two.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.requirements.sha256

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
fi

wanted=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$wanted" ]; then
    echo "setup: $VENV is up to date with requirements.txt"
else
    echo "setup: installing requirements.txt (the first time downloads PyTorch and takes a while)"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -r requirements.txt
    echo "$wanted" > "$STAMP"
fi

"$VENV/bin/python" - <<'PY'
from importlib.metadata import version
names = ["torch", "torchvision", "open_clip_torch", "numpy", "pillow", "tqdm",
         "tensorboard", "matplotlib", "webdataset", "pytest"]
print("setup: installed " + ", ".join(f"{n} {version(n)}" for n in names))
PY
