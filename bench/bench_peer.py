"""Throughput: train.py against open_clip's own trainer and a bare loop, on real data with the
shared settings of issue 13.

    .venv/bin/python bench/bench_peer.py                    # 2 rounds; updates bench/README.md
    .venv/bin/python bench/bench_peer.py --rounds 1 --no_readme

Data: the clip-art set of bench/clipart.py (real drawings with 2-4 noisy captions each), its
first --train_images training images; train.py reads train/data.json, open_clip_train the same
images as train/data.csv (one row per caption). Shared settings: the tiny-vit-64 preset, batch
128, fp32, 2 DataLoader workers, learning rate 1e-3, warmup 100, and the same number of optimiser
steps: open_clip_train trains EPOCHS epochs of caption rows, train.py gets that many steps as
--max_steps and validates once, at the end. Everything else is each trainer's default
(augmentation, caption sampling, checkpoints, logging).

Samples/s is over the whole run from its first step to its last, every epoch boundary, log line
and checkpoint included and validation left out (common._job_train, common._job_open_clip_train).
The bare loop (common.bare_loop) is forward, loss, backward and fused AdamW on one batch of
tensors in memory: the model's cost and nothing else; it runs twice, with glibc's malloc as it
comes and with the thresholds train.py sets (runtime.tune_malloc: freed buffers are kept for the
next step instead of being faulted in again). Each run is a fresh process; runs alternate
so that a drifting load hurts all alike. Targets (issue 13): train.py >= 1.05 x open_clip_train,
>= 0.97 x the bare loop.

open_clip_train needs pandas and braceexpand, which open_clip_torch does not install:
`pip install pandas braceexpand`.
"""
import argparse
import shutil
import statistics

from bench_quality import SHARED, THEIRS, prepare_data, theirs_argv

import common

HEADING = "## bench_peer.py"
EPOCHS = 2            # open_clip_train's epochs (of caption rows); train.py gets the same steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the four runs")
    parser.add_argument("--train_images", type=int, default=1900, help="training images (0: all)")
    parser.add_argument("--image_size", type=int, default=128, help="clip-art side in pixels")
    parser.add_argument("--data_seed", type=int, default=0, help="seed of the clip-art split")
    parser.add_argument("--no_readme", action="store_true", help="print the tables only")
    args = parser.parse_args()
    data = prepare_data(args)
    steps = EPOCHS * (data.rows // SHARED["batch"])

    def ours():
        argv = common.train_argv(
            data.train, "--val_data", data.val, "--model_name", SHARED["model"],
            "--batch_size", SHARED["batch"], "--precision", SHARED["precision"],
            "--num_workers", SHARED["workers"], "--learning_rate", SHARED["lr"],
            "--warmup_steps", SHARED["warmup"], "--max_steps", steps, "--eval_every", steps)
        result = common.run_job("train", {"argv": argv}, log_name="peer-ours")
        shutil.rmtree(result["checkpoint_dir"], ignore_errors=True)
        return result

    def theirs():
        logs = common.OUT / "runs" / "open_clip_train" / "peer"
        shutil.rmtree(logs, ignore_errors=True)
        result = common.run_job("open_clip_train", {"argv": theirs_argv(data, THEIRS, EPOCHS, 0, False, logs)},
                                log_name="peer-theirs")
        shutil.rmtree(logs, ignore_errors=True)
        return {**result, "samples": steps * SHARED["batch"],
                "samples_per_s": steps * SHARED["batch"] / result["loop_s"]}

    def bare(malloc=False):
        return lambda: common.run_job("bare", {"model_name": SHARED["model"], "batch_size": SHARED["batch"],
                                               "precision": SHARED["precision"], "steps": steps, "fused": True,
                                               "malloc": malloc}, log_name="peer-bare")

    def report(name, r, result):
        print(f"round {r + 1} {name:16}: {result['samples_per_s']:6.1f} samples/s "
              f"(load {common.load_average():.1f})", flush=True)

    load_before = common.load_average()
    runs = common.alternate({"train.py": ours, "open_clip_train": theirs, "bare loop": bare(),
                             "bare loop, train.py's malloc": bare(malloc=True)}, args.rounds, report)
    load_after = common.load_average()
    rows = [[f"{name}, round {r}", f"{result['loop_s']:.1f}", f"{result['samples_per_s']:.1f}",
             f"{result.get('startup_s', 0):.1f}", f"{result['peak_mib']:,.0f}"]
            for name, results in runs.items() for r, result in enumerate(results, 1)]
    results_table = common.table(["run", "loop (s)", "samples/s", "start-up (s)", "peak RSS (MiB)"], rows)

    summary = summary_table(runs)
    print(f"\n{results_table}\n\n{summary}")
    if args.no_readme:
        return
    common.write_readme(HEADING, f"""{HEADING}

Throughput of train.py, open_clip's trainer (`open_clip_train.main`, run unchanged after
registering our presets) and a bare loop (forward, loss, backward, fused AdamW on tensors in
memory; with glibc's malloc as it comes, and again with the thresholds train.py sets, which keep
a step's freed buffers for the next step), on the clip-art set of bench/clipart.py ({data.images} training images, {data.rows}
caption rows), {SHARED['model']}, batch {SHARED['batch']}, {SHARED['precision']}, {SHARED['workers']} DataLoader workers,
learning rate {SHARED['lr']}, warmup {SHARED['warmup']}, {steps} optimiser steps each ({EPOCHS} of open_clip_train's
epochs of caption rows), CPU. Samples/s: from the first step to the last, epoch boundaries,
logging and checkpoints included, validation left out. Each run in a fresh process, alternating.
(train.py, its images cached on a CPU, builds its batches in the training process and uses the
workers to decode the cache; open_clip_train's workers build every batch.) The four share the
machine with whatever else runs on its host: a run's rate can move by 10-15% from one run to
the next, so the ratios are taken round by round and their median is the figure.
Machine: {common.machine()}; load average {load_before:.1f} before, {load_after:.1f} after.
Rerun: {common.rerun()} (needs `pip install pandas braceexpand`).

{results_table}

{summary}
""")


def summary_table(runs: dict) -> str:
    """train.py's samples/s over each other run's, round by round: median (range), and the
    issue's verdicts."""
    def ratios(other):
        return [a["samples_per_s"] / b["samples_per_s"] for a, b in zip(runs["train.py"], runs[other])]
    targets = {"open_clip_train": 1.05, "bare loop": 0.97, "bare loop, train.py's malloc": None}
    return common.table(["samples/s ratio", "median (range)", "target", "verdict"], [
        [f"train.py / {other}", common.median_spread(ratios(other)), f">= {target}" if target else "",
         ("met" if statistics.median(ratios(other)) >= target else "NOT met") if target else ""]
        for other, target in targets.items()])


if __name__ == "__main__":
    main()
