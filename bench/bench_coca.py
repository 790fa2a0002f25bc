"""What CoCa's captioning head costs and gives: the tiny CoCa preset against the tiny CLIP preset
at equal steps on the clip-art set (bench_quality.py's data and shared settings).

    .venv/bin/python bench/bench_coca.py                 # two seeds; updates bench/README.md
    .venv/bin/python bench/bench_coca.py --steps 40 --seeds 0 --no_readme   # a smoke run

Each run is `train.py` in a fresh process (common._job_train_eval), validating once, at its end;
its final weights are then evaluated on the test split by evaluation.py, as a user would: retrieval
for both, and for CoCa the captions it writes for every test image, scored against that image's
captions (BLEU-4 and CIDEr-D, evaluation.caption_metrics) with open_clip's generation settings.
Samples/s is train.py's own measure of its loop without validation (timing.samples over loop_s),
the two models run in alternating order per seed (A B, then B A), so a drifting load touches
both alike. Timings are only meaningful on a quiet machine.
"""
import argparse
import json
import subprocess
import sys

import bench_quality
import clipart

import common

HEADING = "## bench_coca.py"
MODELS = {"CLIP (tiny-vit-64)": "tiny-vit-64", "CoCa (tiny-coca-64)": "tiny-coca-64"}
STEPS = 336                 # bench_quality.py's: open_clip_train's 3 epochs of caption rows


def run(data: bench_quality.Data, model: str, steps: int, seed: int) -> dict:
    """Train `model` for `steps` steps, then evaluate its last.pt on the test split."""
    shared = bench_quality.SHARED
    argv = common.train_argv(
        data.train, "--val_data", data.val, "--model_name", model, "--batch_size", shared["batch"],
        "--precision", shared["precision"], "--num_workers", shared["workers"],
        "--learning_rate", shared["lr"], "--warmup_steps", shared["warmup"], "--max_steps", steps,
        "--eval_every", steps, "--seed", seed)
    trained = common.run_job("train_eval", {"argv": argv, "eval": str(data.test)},
                             log_name=f"coca-{model}-seed{seed}")
    output = common.OUT / "runs" / f"coca-eval-{model}-seed{seed}.json"
    subprocess.run([sys.executable, str(common.REPO / "evaluation.py"), "--checkpoint", trained["checkpoint"],
                    "--data", str(data.test), "--output", str(output), "--num_workers", "0"],
                   cwd=common.OUT, check=True, stdout=subprocess.DEVNULL)
    evaluated = json.loads(output.read_text())
    timing = trained["timing"]
    return {"model": model, "seed": seed, "steps": steps,
            "samples_per_s": timing["samples"] / (timing["loop_s"] - timing["validation_s"]),
            "retrieval": evaluated["retrieval"], "captioning": evaluated.get("captioning")}


def section(args, runs: list, loads) -> str:
    rows = []
    for name, model in MODELS.items():
        for r in (r for r in runs if r["model"] == model):
            retrieval, captions = r["retrieval"], r["captioning"] or {}
            rows.append([name, r["seed"], f"{r['samples_per_s']:.0f}",
                         f"{retrieval['text_to_image']['R@1']:.1f}", f"{retrieval['image_to_text']['R@1']:.1f}",
                         f"{retrieval['mean_recall']:.1f}",
                         *[f"{captions[k]:.1f}" if k in captions else "-" for k in ("BLEU-4_x100", "CIDEr-D_x100")]])
    clip, coca = ([r for r in runs if r["model"] == m] for m in MODELS.values())
    speed = common.median_spread([b["samples_per_s"] / a["samples_per_s"] for a, b in zip(clip, coca)])
    recall = common.median_spread([b["retrieval"]["mean_recall"] / a["retrieval"]["mean_recall"]
                                   for a, b in zip(clip, coca)])
    table = common.table(["model", "seed", "samples/s", "t->i R@1", "i->t R@1", "mean recall", "BLEU-4",
                          "CIDEr-D"], rows)
    shared = bench_quality.SHARED
    return f"""{HEADING}

The tiny CoCa preset against the tiny CLIP preset at equal steps: {args.steps} steps of batch
{shared['batch']}, learning rate {shared['lr']}, warm-up {shared['warmup']}, {shared['precision']},
{shared['workers']} workers, on the clip-art set (bench/clipart.py; test split: 546 images, 1,726
captions). Recall and captions of the final weights on the test split, by evaluation.py; captions
with open_clip's generation settings (beam search, 6 beams), scored against all of an image's
captions (x100; CIDEr-D's document frequencies come from the test split's own captions).
Machine: {common.machine()}; load average {loads[0]:.1f} before, {loads[1]:.1f} after. Rerun:
{common.rerun()}.

{table}

CoCa / CLIP, median (range) over seeds {', '.join(map(str, args.seeds))}: samples/s
{speed}, test mean recall {recall}.
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS, help="optimiser steps of each run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of the runs")
    parser.add_argument("--no_readme", action="store_true", help="print the table only")
    args = parser.parse_args()
    root = clipart.build(size=128, seed=0)
    data = bench_quality.Data(root / "train", root / "val", root / "test", 0, 0)
    loads = [common.load_average()]
    runs = []
    for k, seed in enumerate(args.seeds):
        for model in (list(MODELS.values()) if k % 2 == 0 else list(MODELS.values())[::-1]):
            runs.append(run(data, model, args.steps, seed))
            print({key: value for key, value in runs[-1].items() if key != "retrieval"}, flush=True)
    loads.append(common.load_average())
    text = section(args, runs, loads)
    print(text)
    if not args.no_readme:
        common.write_readme(HEADING, text)


if __name__ == "__main__":
    main()
