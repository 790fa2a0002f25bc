"""Data pipeline: images/s train.py's DataLoader delivers with 0, 1 and 2 workers against the
samples/s the model consumes, and the share of each step train.py spends waiting for data.

    .venv/bin/python bench/bench_data.py                     # 2 rounds; updates bench/README.md
    .venv/bin/python bench/bench_data.py --rounds 1 --no_readme

The loader alone (common._job_loader): the generated set of 2000 images (64 px PNG files),
TrainDataset, EpochSampler and build_dataloader as train.py builds them (file reading, decoding,
augmentation, tokenisation, collation), iterated for 2 whole epochs with no model. The model
alone: the bare loop (common.bare_loop) of tiny-vit-64, batch 64, fp32. Headroom is the loader's
images/s over the model's samples/s: below 1 the loader cannot keep up even with the cores to
itself; above 1 it can, but during training its workers take CPU time from the model.
Data wait: train.py's own measure (TensorBoard tag train/data_wait, the share of each logging
window spent waiting for the next batch), averaged over the windows of a 2-epoch run; samples/s is
that run's loop, as in bench_overhead.py. Target (issue 8): under 5% in the default
configuration (2 workers).
"""
import argparse
import shutil
import statistics

import common

HEADING = "## bench_data.py"
WORKERS = (0, 1, 2)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="rounds of all runs, alternating")
    parser.add_argument("--repo", default=str(common.REPO), help="repository whose code is measured")
    parser.add_argument("--no_readme", action="store_true", help="print the tables only")
    args = parser.parse_args()
    repo = common.Path(args.repo)
    data = common.sample_data(2000) / "data.json"
    batch = 64

    def loader(workers):
        return lambda: common.run_job("loader", {"data": str(data), "batch_size": batch, "epochs": 2,
                                                 "num_workers": workers}, repo=repo, log_name="data-loader")

    def train(workers):
        def run():
            argv = common.train_argv(data, "--num_epochs", 2, "--num_workers", workers, repo=repo)
            result = common.run_job("train", {"argv": argv}, repo=repo, log_name="data-train")
            shutil.rmtree(result["checkpoint_dir"], ignore_errors=True)
            return result
        return run

    sides = {f"loader {w}": loader(w) for w in WORKERS}
    sides["bare"] = lambda: common.run_job("bare", {"batch_size": batch, "steps": 30}, repo=repo,
                                           log_name="data-bare")
    sides.update({f"train {w}": train(w) for w in WORKERS})

    def report(name, r, result):
        speed = result.get("images_per_s") or result["samples_per_s"]
        wait = f", data wait {100 * result['data_wait']:.1f}%" if "data_wait" in result else ""
        print(f"round {r + 1} {name:9}: {speed:7.1f}/s{wait} (load {common.load_average():.1f})", flush=True)

    load_before = common.load_average()
    runs = common.alternate(sides, args.rounds, report)
    load_after = common.load_average()
    model = [r["samples_per_s"] for r in runs["bare"]]
    loader_rows, train_rows = [], []
    for w in WORKERS:
        delivered = [r["images_per_s"] for r in runs[f"loader {w}"]]
        loader_rows.append([w, f"{statistics.median(delivered):.0f}", f"{statistics.median(model):.0f}",
                            common.median_spread([d / m for d, m in zip(delivered, model)])])
        trained = runs[f"train {w}"]
        waits = [100 * r["data_wait"] for r in trained]
        train_rows.append([f"{w}{' (default)' if w == 2 else ''}", f"{statistics.median(waits):.1f}",
                           f"{max(100 * r['data_wait_max'] for r in trained):.1f}",
                           f"{statistics.median(r['samples_per_s'] for r in trained):.1f}",
                           common.median_spread([r["samples_per_s"] / m for r, m in zip(trained, model)])])
    loader_table = common.table(["workers", "loader alone (images/s)", "model (samples/s)",
                                 "headroom, loader / model"], loader_rows)
    train_table = common.table(["train.py workers", "data wait, mean of windows (%)",
                                "data wait, worst window (%)", "train.py (samples/s)",
                                "train.py / bare loop"], train_rows)
    default_wait = statistics.median(100 * r["data_wait"] for r in runs["train 2"])
    summary = (f"Data wait in the default configuration: {default_wait:.1f}% (median of {args.rounds} runs): "
               f"target under 5% {'met' if default_wait < 5 else 'NOT met'}.")
    print(f"\n{loader_table}\n\n{train_table}\n\n{summary}")
    if args.no_readme:
        return
    common.write_readme(HEADING, f"""{HEADING}

The data pipeline of train.py: images/s its DataLoader delivers with no model (2000 generated
64 px PNG files: reading, decoding, random resized crop, colour jitter, tokenisation, collation;
2 whole epochs), against the samples/s the model consumes (the bare loop of tiny-vit-64, batch
{batch}, fp32); and the share of each step train.py waits for data (TensorBoard `train/data_wait`,
mean over the logging windows of a 2-epoch run) with 0, 1 and 2 workers. Each run in a fresh
process, alternating, {args.rounds} rounds; medians.
Machine: {common.machine()}; load average {load_before:.1f} before, {load_after:.1f} after.
Rerun: `.venv/bin/python bench/bench_data.py`.

{loader_table}

{train_table}

{summary}
""")


if __name__ == "__main__":
    main()
