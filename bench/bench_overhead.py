"""Harness overhead: samples/s of train.py's real loop against the bare loop of the same model.

    .venv/bin/python bench/bench_overhead.py                     # 3 rounds; updates bench/README.md
    .venv/bin/python bench/bench_overhead.py --rounds 1 --no_readme     # a quick look
    .venv/bin/python bench/bench_overhead.py --train_args --num_workers 1   # another setting

train.py runs in a fresh process in its default configuration (config.json: tiny-vit-64, batch
64, fp32 on a CPU, 2 workers, augmentation) on a generated set of 2000 images (1800 train, 200
validation), for whole epochs, with --save_every 20 so that periodic checkpoints happen too. Its
loop time holds every step, epoch boundary, log line and checkpoint, and leaves out validation,
which is reported on its own (see common._job_train). The bare loop (common.bare_loop) runs the
same number of steps of the same model, batch and precision on tensors in memory, also in a fresh
process with torch's default threads. The two alternate, and each round's ratio is train.py's
samples/s over the bare loop's. Target (issue 8): a median ratio of at least 0.97.
"""
import argparse
import shutil
import statistics

import common

HEADING = "## bench_overhead.py"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="pairs of runs (train.py, bare loop)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each train.py run")
    parser.add_argument("--num_images", type=int, default=2000, help="images of the generated set")
    parser.add_argument("--save_every", type=int, default=20, help="train.py --save_every")
    parser.add_argument("--repo", default=str(common.REPO), help="repository whose train.py is measured")
    parser.add_argument("--no_readme", action="store_true", help="print the table only")
    parser.add_argument("--train_args", nargs=argparse.REMAINDER, default=[],
                        help="further train.py flags, e.g. --num_workers 1 (must come last)")
    args = parser.parse_args()
    repo = common.Path(args.repo)
    data = common.sample_data(args.num_images) / "data.json"
    flags = ["--num_epochs", args.epochs, "--save_every", args.save_every, *args.train_args]
    probe = common.train_argv(data, *flags, repo=repo)
    cfg = _config(repo, probe)
    steps = args.epochs * (round(args.num_images * (1 - cfg.val_fraction)) // cfg.batch_size)
    precision = "fp32" if cfg.precision == "auto" else cfg.precision

    def run_train():
        result = common.run_job("train", {"argv": common.train_argv(data, *flags, repo=repo)},
                                repo=repo, log_name="overhead-train")
        shutil.rmtree(result["checkpoint_dir"], ignore_errors=True)   # ~100 MB each, not needed
        return result

    def run_bare():
        return common.run_job("bare", {"model_name": cfg.model_name, "batch_size":
                                       cfg.batch_size, "precision": precision,
                                       "steps": steps}, repo=repo, log_name="overhead-bare")

    def report(name, r, result):
        print(f"round {r + 1} {name:5}: {result['samples_per_s']:6.1f} samples/s "
              f"(load {common.load_average():.1f})", flush=True)

    load_before = common.load_average()
    runs = common.alternate({"train": run_train, "bare": run_bare}, args.rounds, report)
    load_after = common.load_average()
    rows, ratios = [], []
    for r, (t, b) in enumerate(zip(runs["train"], runs["bare"]), 1):
        ratios.append(t["samples_per_s"] / b["samples_per_s"])
        rows.append([r, f"{t['samples_per_s']:.1f}", f"{b['samples_per_s']:.1f}", f"{ratios[-1]:.2f}",
                     f"{100 * t['data_wait']:.1f}", f"{t['validation_s'] / t['validations']:.1f}",
                     f"{t['startup_s']:.1f}", t["threads"], b["threads"]])
    result = common.table(["round", "train.py (samples/s)", "bare loop (samples/s)", "ratio",
                           "data wait (%)", "validation (s each)", "start-up (s)",
                           "train threads", "bare threads"], rows)
    median = statistics.median(ratios)
    verdict = "met" if median >= 0.97 else "NOT met"
    summary = (f"Median ratio {common.median_spread(ratios)} over {args.rounds} rounds: target 0.97 "
               f"{verdict}.")
    print(f"\n{result}\n\n{summary}")
    if args.no_readme:
        return
    extra = f" {' '.join(args.train_args)}" if args.train_args else ""
    common.write_readme(HEADING, f"""{HEADING}

Harness overhead: samples/s of `train.py`'s real loop against the bare loop (forward, loss,
backward, AdamW step on tensors in memory), same model ({cfg.model_name}), batch
({cfg.batch_size}) and precision ({precision}). train.py: default configuration{extra}, {args.epochs} whole
epochs of a generated set of {args.num_images} images (1 in 10 held out for validation), reading
PNG files with augmentation and tokenisation in DataLoader workers, gradient clipping, schedule,
logging, `--save_every {args.save_every}` checkpoints, best.pt after each validation; its
validation time is left out and shown on its own. Each side in a fresh process, alternating.
Machine: {common.machine()}; load average {load_before:.1f} before, {load_after:.1f} after.
Rerun: `.venv/bin/python bench/bench_overhead.py`.

{result}

{summary}
""")


def _config(repo, argv):
    """train.py's resolved settings for argv (imports train.py only: no torch)."""
    import sys
    sys.path.insert(0, str(repo))
    import train
    return train.parse_config(argv)


if __name__ == "__main__":
    main()
