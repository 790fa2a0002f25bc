"""Check that this machine can run the project: `python verify.py`.

Prints one row per check with a hint for each failure, and exits non-zero if anything failed.
Every import of torch and of the project's modules is made inside the check that needs it: an
installation that is broken is what this script reports, in a row, instead of failing to start.
"""
import argparse
import importlib
import re
import sys
import tempfile
import traceback
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parent
MODULES = ["errors", "sample_data", "augmentation", "data_loader", "shards", "clip_model", "evaluation",
           "distillation", "train", "visualization", "demo", "wise_ft", "search_app", "export"]
OUTPUT_FOLDERS = ["data", "model-checkpoint", "results", "logs"]
SETUP_HINT = "run: bash setup.sh (installs requirements.txt into .venv)"


def required_packages():
    """Distribution names from requirements.txt (the one list of what we need)."""
    names = []
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            names.append(re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0])
    return names


def check_python():
    ok = sys.version_info >= (3, 10)   # torch 2.6+ and webdataset 1.x need it; the code uses X | None
    return ok, sys.version.split()[0], "install Python 3.10 or newer"


def check_package(name):
    try:
        return True, version(name), ""
    except PackageNotFoundError:
        return False, "not installed", SETUP_HINT


def check_devices():
    import torch
    found = [f"CPU ({torch.get_num_threads()} threads)"]
    if torch.cuda.is_available():
        found += [f"CUDA {i}: {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        found.append("MPS")
    return True, ", ".join(found), ""


def check_import(module):
    try:
        importlib.import_module(module)
        return True, "imports", ""
    except Exception as error:  # report any failure as a row, never crash the table
        return False, f"{type(error).__name__}: {error}", SETUP_HINT


def check_forward_backward():
    import torch

    import clip_model
    setup = clip_model.build_model("tiny-vit-64")
    images = torch.randn(2, 3, 64, 64)
    texts = setup.tokenizer(["a red circle", "一个蓝色的方形"])
    out = setup.model(images, texts)
    loss = clip_model.ContrastiveLoss()(out["image_features"], out["text_features"],
                                        out["logit_scale"], torch.arange(2))
    loss.backward()
    ok = bool(torch.isfinite(loss)) and setup.model.visual.proj.grad is not None
    return ok, f"tiny-vit-64 loss {loss.item():.3f}", "see the traceback; reinstall torch/open_clip"


def check_writable(folder):
    path = ROOT / folder
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
        return True, str(path), ""
    except OSError as error:
        return False, str(error), f"make {path} writable, or run from a folder you own"


def check_cjk_font():
    from visualization import find_cjk_font
    font = find_cjk_font()
    if font:
        return True, font, ""
    return None, "none: Chinese captions will render as boxes in plots", \
        "apt-get install fonts-noto-cjk (Debian/Ubuntu), or any Noto Sans CJK / WenQuanYi font"


def run_checks():
    checks = [("python", check_python)]
    checks += [(f"package {n}", lambda n=n: check_package(n)) for n in required_packages()]
    checks += [("devices", check_devices)]
    checks += [(f"module {m}", lambda m=m: check_import(m)) for m in MODULES]
    checks += [("forward+backward", check_forward_backward), ("CJK font", check_cjk_font)]
    checks += [(f"writable {f}/", lambda f=f: check_writable(f)) for f in OUTPUT_FOLDERS]
    rows = []
    for name, check in checks:
        try:
            rows.append((name, *check()))
        except Exception as error:
            detail = traceback.format_exception_only(type(error), error)[-1].strip()
            rows.append((name, False, detail, SETUP_HINT))
    return rows


def build_parser():
    return argparse.ArgumentParser(description=__doc__)


def main(argv=None):
    build_parser().parse_args(argv)
    sys.path.insert(0, str(ROOT))
    rows = run_checks()
    width = max(len(name) for name, *_ in rows)
    for name, ok, detail, hint in rows:
        status = {True: "ok", False: "FAIL", None: "warn"}[ok]
        print(f"{name:<{width}}  {status:<4}  {detail}" + (f"\n{'':<{width + 8}}fix: {hint}" if ok is not True else ""))
    failed = [name for name, ok, *_ in rows if ok is False]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} checks passed"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
