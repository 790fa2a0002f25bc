"""Harness overhead: samples/s of train.py's real loop against the bare loop of the same model.

    .venv/bin/python bench/bench_overhead.py                     # 3 rounds; updates bench/README.md
    .venv/bin/python bench/bench_overhead.py --rounds 1 --no_readme     # a quick look
    .venv/bin/python bench/bench_overhead.py --train_args --num_workers 1   # another setting

train.py runs in a fresh process in its default configuration (config.json: tiny-vit-64, batch
64, fp32 on a CPU, 2 workers, augmentation) on a generated set of 2000 images (1800 train, 200
validation), for 2 whole epochs, with --save_every 50 so that a periodic checkpoint happens too
(besides best.pt after each validation and the final last.pt). Its loop time holds every step,
epoch boundary, log line and checkpoint, and leaves out validation, which is reported on its own
(see common._job_train). The bare loop (common.bare_loop) runs the same number of steps of the
same model, batch and precision on tensors in memory, in a fresh process, twice: with torch's
defaults (AdamW's default implementation, OpenMP's default spinning), and tuned (fused AdamW,
GOMP_SPINCOUNT=1000), the fastest bare loop found here. The three alternate; each round's ratios
are train.py's samples/s over each bare loop's. Target (issue 8): a median ratio of at least 0.97
against the tuned bare loop (against the untuned one train.py would get credit for the optimiser
and thread settings, which are not harness overhead).
"""
import argparse
import shutil
import statistics

import common

HEADING = "## bench_overhead.py"
# The tuned bare loop: fused AdamW, and OpenMP threads that spin only briefly before they sleep
# (GNU OpenMP's default spins for ~300000 rounds, which costs dearly when the cores are shared).
TUNED_ENV = {"GOMP_SPINCOUNT": "1000"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three runs")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each train.py run")
    parser.add_argument("--num_images", type=int, default=2000, help="images of the generated set")
    parser.add_argument("--save_every", type=int, default=50, help="train.py --save_every")
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

    def bare(**settings):
        params = {"model_name": cfg.model_name, "batch_size": cfg.batch_size, "precision": precision,
                  "steps": steps}
        return lambda: common.run_job("bare", {**params, **settings.get("params", {})},
                                      env=settings.get("env"), repo=repo, log_name="overhead-bare")

    def report(name, r, result):
        print(f"round {r + 1} {name:5}: {result['samples_per_s']:6.1f} samples/s "
              f"(load {common.load_average():.1f})", flush=True)

    load_before = common.load_average()
    runs = common.alternate({"train": run_train, "bare": bare(),
                             "tuned": bare(params={"fused": True}, env=TUNED_ENV)}, args.rounds, report)
    load_after = common.load_average()
    result, ratios, tuned_ratios = rounds_table(runs)
    parts = time_parts(runs, steps)
    breakdown = common.table(["ms per step (median of rounds)", "train.py", "tuned bare loop",
                              "difference"],
                             [[name, f"{a:.1f}", f"{b:.1f}", f"{a - b:+.1f}"] for name, a, b in parts])
    verdict = "met" if statistics.median(tuned_ratios) >= 0.97 else "NOT met"
    summary = (f"Median ratio over {args.rounds} rounds: {common.median_spread(ratios)} against the bare "
               f"loop, {common.median_spread(tuned_ratios)} against the tuned bare loop, which is the "
               f"one the target is judged by: target 0.97 {verdict}.")
    print(f"\n{result}\n\n{breakdown}\n\n{summary}")
    if not args.no_readme:
        common.write_readme(HEADING, readme_section(args, cfg, precision, (load_before, load_after),
                                                    (result, breakdown, summary), parts))


def rounds_table(runs: dict) -> tuple[str, list, list]:
    """Each round's samples/s and ratios; the ratios against the bare and the tuned bare loop."""
    rows, ratios, tuned_ratios = [], [], []
    for r, (t, b, u) in enumerate(zip(runs["train"], runs["bare"], runs["tuned"]), 1):
        ratios.append(t["samples_per_s"] / b["samples_per_s"])
        tuned_ratios.append(t["samples_per_s"] / u["samples_per_s"])
        rows.append([r, f"{t['samples_per_s']:.1f}", f"{b['samples_per_s']:.1f}", f"{u['samples_per_s']:.1f}",
                     f"{ratios[-1]:.2f}", f"{tuned_ratios[-1]:.2f}", f"{100 * t['data_wait']:.1f}",
                     f"{t['validation_s'] / t['validations']:.1f}", f"{t['startup_s']:.1f}"])
    table = common.table(["round", "train.py (samples/s)", "bare loop (samples/s)",
                          "tuned bare loop (samples/s)", "train.py / bare", "train.py / tuned bare",
                          "data wait (%)", "validation (s each)", "start-up (s)"], rows)
    return table, ratios, tuned_ratios


def time_parts(runs: dict, steps: int) -> list:
    """Where a step's time goes: [part, train.py ms, tuned bare loop ms], medians of the rounds."""
    def per_step(results, key):
        return statistics.median(1000 * r.get(key, 0.0) / steps for r in results)
    t, u = runs["train"], runs["tuned"]
    parts = [["forward and backward (backward_step)", per_step(t, "model_s"), per_step(u, "model_s")],
             ["waiting for data", per_step(t, "data_s"), 0.0],
             ["checkpoints (save_checkpoint)", per_step(t, "checkpoint_s"), 0.0],
             ["gradient clipping", per_step(t, "clip_s"), 0.0],
             ["optimiser step, schedule, logging, the rest", per_step(t, "rest_s"),
              per_step(u, "loop_s") - per_step(u, "model_s")]]
    parts.append(["the whole step", sum(row[1] for row in parts), sum(row[2] for row in parts)])
    return parts


def readme_section(args, cfg, precision, loads, tables, parts) -> str:
    """bench/README.md's section: the tables with what they show."""
    result, breakdown, summary = tables
    extra = f" {' '.join(args.train_args)}" if args.train_args else ""
    return f"""{HEADING}

Harness overhead: samples/s of `train.py`'s real loop against the bare loop (forward, loss,
backward, AdamW step on tensors in memory), same model ({cfg.model_name}), batch
({cfg.batch_size}) and precision ({precision}). train.py: default configuration{extra}, {args.epochs} whole
epochs of a generated set of {args.num_images} images (1 in 10 held out for validation), reading
PNG files with augmentation and tokenisation in DataLoader workers, gradient clipping, schedule,
logging, `--save_every {args.save_every}` checkpoints, best.pt after each validation; its
validation time is left out and shown on its own. Bare loop: torch's defaults; tuned bare
loop: fused AdamW and `GOMP_SPINCOUNT=1000`. Each run in a fresh process, alternating,
{args.rounds} rounds. Machine: {common.machine()}; load average {loads[0]:.1f} before, {loads[1]:.1f} after.
Rerun: {common.rerun()}.

{result}

Where the time goes, in ms per step: the loop time of train.py split by timers around
`backward_step`, the training DataLoader's `__next__`, `save_checkpoint` and
`clip_grad_norm_` (see common._job_train), against the tuned bare loop's forward-backward and
optimiser step.

{breakdown}

{summary}

- Most of the difference is the model itself running slower inside train.py
  ({parts[0][1] - parts[0][2]:+.0f} ms of forward and backward per step): the DataLoader workers read,
  decode, augment and tokenise about 0.7 ms of CPU per sample on the same 2 cores (bench_data.py),
  and while a worker holds a core one of the model's two threads waits, and its partner with it.
  In an ad-hoc run with every sample computed before the loop and no workers, train.py's
  forward and backward took as long as the bare loop's, and its loop reached 0.87 of the tuned
  bare loop; the rest was checkpoints, clipping and the data loader's own overhead.
- Checkpoints: each save writes the weights and the AdamW state (96 MB for tiny-vit-64) and
  fsyncs them, 0.1-0.2 s; best.pt is written after every validation that improves, which on
  this set means almost every epoch of 28 steps.
"""


def _config(repo, argv):
    """train.py's resolved settings for argv (imports train.py only: no torch)."""
    import sys
    sys.path.insert(0, str(repo))
    import train
    return train.parse_config(argv)


if __name__ == "__main__":
    main()
