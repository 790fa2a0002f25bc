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

# (pip warns about every package missing from this machine's extra local indexes: noise)
quiet_pip() { "$VENV/bin/python" -m pip install --quiet "$@" 2> >(grep -v "is ignored: it is neither" >&2); }

wanted=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$wanted" ]; then
    echo "setup: $VENV is up to date with requirements.txt"
else
    echo "setup: installing requirements.txt (the first time downloads PyTorch and takes a while)"
    quiet_pip --upgrade pip
    quiet_pip -r requirements.txt
    echo "$wanted" > "$STAMP"
fi

# The tests compare our Chinese-CLIP models (chinese_clip.py) with Chinese-CLIP's own package,
# cn_clip, the reference; nothing else imports it. It is installed without its dependencies: it
# pins lmdb==1.3.0, which would replace ours, and requirements.txt cannot say --no-deps. Its model
# and tokenizer (cn_clip.clip) need torch, torchvision and numpy, ours, and six, installed with it.
if ! "$VENV/bin/python" -c "import cn_clip.clip" >/dev/null 2>&1; then
    echo "setup: installing cn_clip 1.6.0, Chinese-CLIP's package, for the tests (without its dependencies)"
    quiet_pip --no-deps cn_clip==1.6.0 six
fi

# Plots of Chinese captions need a CJK font; install one where we can (root with apt-get).
if [ -z "$(fc-list :lang=zh 2>/dev/null || true)" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "setup: installing a CJK font for plots of Chinese captions (fonts-noto-cjk)"
        apt-get update -qq >/dev/null && apt-get install -y -qq fonts-noto-cjk >/dev/null \
            || echo "setup: could not install fonts-noto-cjk; Chinese text in plots will show boxes"
    else
        echo "setup: no CJK font found; for Chinese captions in plots: sudo apt-get install fonts-noto-cjk"
    fi
fi

# The browser tests (search_app.py's page, TensorBoard's views) drive Debian's Chromium with
# Playwright (never Playwright's own browser download); install it where we can.
if ! command -v chromium >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "setup: installing Chromium for the browser tests (chromium)"
        apt-get update -qq >/dev/null && apt-get install -y -qq chromium >/dev/null \
            || echo "setup: could not install chromium; the browser tests will be skipped"
    else
        echo "setup: no Chromium found; the browser tests will be skipped" \
             "(to run them: sudo apt-get install chromium)"
    fi
fi

"$VENV/bin/python" - <<'PY'
import re
from importlib.metadata import version
lines = open("requirements.txt").read().splitlines()
names = [re.split(r"[<>=!~\[; ]", line.strip())[0] for line in lines if line.strip() and not line.startswith("#")]
print("setup: installed " + ", ".join(f"{n} {version(n)}" for n in names))
PY
