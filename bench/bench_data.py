"""Data pipeline: images/s train.py's DataLoader delivers with 0, 1 and 2 workers against the
samples/s the model consumes, and the share of each step train.py spends waiting for data.

    .venv/bin/python bench/bench_data.py                     # 2 rounds; updates bench/README.md
    .venv/bin/python bench/bench_data.py --rounds 1 --no_readme

The loader alone (common._job_loader): the generated set of 2000 images (64 px PNG files),
TrainDataset, EpochSampler and build_dataloader as train.py builds them (file reading, decoding,
augmentation, tokenisation, collation), iterated for 2 whole epochs with no model. The model
alone: the bare loop (common.bare_loop) of tiny-vit-64, batch 64, fp32, fused AdamW as in
train.py, first step untimed. Headroom is the loader's images/s over the model's samples/s:
below 1 the loader cannot keep up even with the cores to itself; above 1 it can, but during
training its workers take CPU time from the model.
Data wait: train.py's own measure (TensorBoard tag train/data_wait, the share of each logging
window spent waiting for the next batch), averaged over the windows of a 2-epoch run; samples/s is
that run's loop, validation left out (common._job_train): with the images decoded every epoch by
0, 1 and 2 workers, and with the default (images cached, batches built in train.py's own process). Target
(issue 8): under 5% in the default configuration.
Two more tables say where the workers' time goes and what threads fighting over the cores cost:
the time of one training sample on one thread for small PNGs, 512 px photos and photos resized
once (`sample_costs`), and the bare loop's speed with torch's threads set three ways, alone and
next to one busy process (`thread_rows`).
"""
import argparse
import json
import shutil
import statistics

import common

HEADING = "## bench_data.py"
WORKERS = (0, 1, 2)


def photo_sets(num_images: int = 200) -> dict:
    """The first num_images images of the generated set as 512 px JPEG files ("photos": what a
    camera or web data set holds), and the same photos resized once to 64 px JPEG (what
    `shards.py --to_webdataset SRC OUT --resize 64` stores): name -> data.json."""
    from PIL import Image
    source = common.sample_data(2000)
    entries = json.loads((source / "data.json").read_text())[:num_images]
    sets = {}
    for name, size, quality in (("512 px JPEG", 512, 90), ("resized once to 64 px JPEG", 64, 95)):
        folder = common.OUT / "data" / f"photos-{size}"
        if not (folder / "data.json").is_file():
            (folder / "images").mkdir(parents=True, exist_ok=True)
            for entry in entries:
                with Image.open(source / entry["image_path"]) as image:
                    photo = image.convert("RGB").resize((512, 512), Image.Resampling.BICUBIC)
                if size != 512:
                    photo = photo.resize((size, size), Image.Resampling.BICUBIC)
                photo.save(folder / entry["image_path"].replace(".png", ".jpg"), quality=quality)
            (folder / "data.json").write_text(json.dumps(
                [{**e, "image_path": e["image_path"].replace(".png", ".jpg")} for e in entries]))
        sets[name] = folder / "data.json"
    return sets


GENERATED, CACHED = "64 px PNG (the generated set)", "the same, from the image cache and token table (train.py's default)"


def sample_costs(repo, rounds: int) -> dict:
    """Microseconds per training sample (TrainDataset's batches of 50: read, decode, augment,
    tokenise; from the image cache and token table: crop (and jitter, when on) and a token lookup
    only) in this process on one thread, as in a DataLoader worker or, cached, in train.py's own
    process; the sets take turns, median of rounds."""
    import sys
    import time
    sys.path.insert(0, str(repo))
    import torch

    import clip_model
    import data_loader
    from augmentation import TrainAugmentation
    torch.set_num_threads(1)
    setup = clip_model.build_model("tiny-vit-64")
    augmentation = TrainAugmentation(setup.preprocess_cfg)
    sets = {GENERATED: common.sample_data(2000) / "data.json", **photo_sets()}
    datasets = {name: data_loader.TrainDataset(data_loader.load_caption_index(path), augmentation, setup.tokenizer)
                for name, path in sets.items()}
    cached_index, cache, tokens = data_loader.cache_training_data(
        data_loader.load_caption_index(sets[GENERATED]), augmentation, setup.tokenizer)
    datasets[CACHED] = data_loader.TrainDataset(cached_index, augmentation, setup.tokenizer, cache=cache,
                                                tokens=tokens)
    times = {name: [] for name in datasets}
    for _ in range(rounds):
        for name, dataset in datasets.items():
            started = time.perf_counter()
            for first in range(0, 200, 50):       # in batches, as a DataLoader asks for them
                dataset.__getitems__(list(range(first, first + 50)))
            times[name].append((time.perf_counter() - started) / 200 * 1e6)
    return {name: statistics.median(values) for name, values in times.items()}


THREADS = {  # name -> (environment, torch threads) of a bare-loop run
    "2 threads, OpenMP default spinning": ({}, 0),
    "2 threads, GOMP_SPINCOUNT=1000": ({"GOMP_SPINCOUNT": "1000"}, 0),
    "1 thread": ({}, 1),
}


def thread_rows(repo, rounds: int, batch: int) -> list:
    """The bare loop with torch's threads set three ways, on idle cores and next to one busy
    process (a stand-in for a DataLoader worker or another job); samples/s, medians."""
    import subprocess
    import sys
    rows = []
    for contended in (False, True):
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if contended else None
        try:
            sides = {name: (lambda env=env, threads=threads: common.run_job(
                "bare", {"batch_size": batch, "steps": 10, "warmup": 1, "threads": threads, "fused": True},
                env=env, repo=repo, log_name="data-threads")) for name, (env, threads) in THREADS.items()}
            runs = common.alternate(sides, rounds)
        finally:
            if busy:
                busy.kill()
                busy.wait()
        for name in THREADS:
            speed = statistics.median(r["samples_per_s"] for r in runs[name])
            rows.append([name, "one busy process" if contended else "idle", f"{speed:.1f}"])
    return rows


def pipeline_runs(repo, data, batch: int, rounds: int) -> dict:
    """The loader alone with 0, 1 and 2 workers, the bare loop, and train.py with 0, 1 and 2
    workers, each in a fresh process, alternating: name -> results of the rounds."""
    def loader(workers):
        return lambda: common.run_job("loader", {"data": str(data), "batch_size": batch, "epochs": 2,
                                                 "num_workers": workers}, repo=repo, log_name="data-loader")

    def train(workers, cache):
        def run():
            argv = common.train_argv(data, "--num_epochs", 2, "--num_workers", workers,
                                     "--cache_images" if cache else "--no-cache_images", repo=repo)
            result = common.run_job("train", {"argv": argv}, repo=repo, log_name="data-train")
            shutil.rmtree(result["checkpoint_dir"], ignore_errors=True)
            return result
        return run

    sides = {f"loader {w}": loader(w) for w in WORKERS}
    sides["bare"] = lambda: common.run_job("bare", {"batch_size": batch, "steps": 30, "warmup": 1, "fused": True},
                                           repo=repo, log_name="data-bare")
    sides.update({f"train {w}": train(w, cache=False) for w in WORKERS})
    sides["train cached"] = train(2, cache=True)

    def report(name, r, result):
        speed = result.get("images_per_s") or result["samples_per_s"]
        wait = f", data wait {100 * result['data_wait']:.1f}%" if "data_wait" in result else ""
        print(f"round {r + 1} {name:9}: {speed:7.1f}/s{wait} (load {common.load_average():.1f})", flush=True)
    return common.alternate(sides, rounds, report)


def pipeline_tables(runs: dict) -> tuple[str, str, str]:
    """The loader's headroom and train.py's data wait tables, and the headroom of 2 workers."""
    model = [r["samples_per_s"] for r in runs["bare"]]
    loader_rows, train_rows = [], []
    for w in WORKERS:
        delivered = [r["images_per_s"] for r in runs[f"loader {w}"]]
        loader_rows.append([w, f"{statistics.median(delivered):.0f}", f"{statistics.median(model):.0f}",
                            common.median_spread([d / m for d, m in zip(delivered, model)])])
    for name, trained in [(f"{w}, images decoded every epoch", runs[f"train {w}"]) for w in WORKERS] + [
            ("cached (the default): batches built in train.py's process", runs["train cached"])]:
        waits = [100 * r["data_wait"] for r in trained]
        train_rows.append([name, f"{statistics.median(waits):.1f}",
                           f"{max(100 * r['data_wait_max'] for r in trained):.1f}",
                           f"{statistics.median(r['samples_per_s'] for r in trained):.1f}",
                           common.median_spread([r["samples_per_s"] / m for r, m in zip(trained, model)])])
    loader_table = common.table(["workers", "loader alone (images/s)", "model (samples/s)",
                                 "headroom, loader / model"], loader_rows)
    train_table = common.table(["train.py workers", "data wait, mean of windows (%)",
                                "data wait, worst window (%)", "train.py (samples/s)",
                                "train.py / bare loop"], train_rows)
    return loader_table, train_table, loader_rows[2][3]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="rounds of all runs, alternating")
    parser.add_argument("--repo", default=str(common.REPO), help="repository whose code is measured")
    parser.add_argument("--no_readme", action="store_true", help="print the tables only")
    args = parser.parse_args()
    repo = common.Path(args.repo)
    batch = 64
    load_before = common.load_average()
    runs = pipeline_runs(repo, common.sample_data(2000) / "data.json", batch, args.rounds)
    load_after = common.load_average()
    loader_table, train_table, headroom = pipeline_tables(runs)
    rows = thread_rows(repo, args.rounds, batch)
    threads_table = common.table(["torch threads", "other load", "bare loop (samples/s)"], rows)
    speed = {(name, load): float(value) for name, load, value in rows}
    costs = sample_costs(repo, 2 * args.rounds + 1)
    model_us = 1e6 / statistics.median(r["samples_per_s"] for r in runs["bare"])
    cost_table = common.table(["images", "worker time per sample (us)", "vs the model's time per sample"],
                              [[name, f"{us:.0f}", f"{us / model_us:.2f}"] for name, us in costs.items()])
    default_wait = statistics.median(100 * r["data_wait"] for r in runs["train cached"])
    summary = (f"Data wait in the default configuration: {default_wait:.1f}% (median of {args.rounds} runs): "
               f"target under 5% {'met' if default_wait < 5 else 'NOT met'}.")
    print(f"\n{loader_table}\n\n{train_table}\n\n{cost_table}\n\n{threads_table}\n\n{summary}")
    if not args.no_readme:
        common.write_readme(HEADING, readme_section(
            args, batch, (load_before, load_after), (loader_table, train_table, cost_table, threads_table),
            summary, headroom, costs, model_us, speed))


def readme_section(args, batch, loads, tables, summary, headroom, costs, model_us, speed) -> str:
    """bench/README.md's section: the tables with what they show."""
    loader_table, train_table, cost_table, threads_table = tables
    busy = {name: speed[name, "one busy process"] / speed[name, "idle"] for name in THREADS}
    return f"""{HEADING}

The data pipeline of train.py: images/s its DataLoader delivers with no model (2000 generated
64 px PNG files: reading, decoding, random resized crop (colour jitter when on), tokenisation, collation;
2 whole epochs), against the samples/s the model consumes (the bare loop of tiny-vit-64, fused AdamW, batch
{batch}, fp32); and the share of each step train.py waits for data (TensorBoard `train/data_wait`,
mean over the logging windows of a 2-epoch run) with its images decoded every epoch by 0, 1 and 2
workers (`--no-cache_images`; train.py then spins OpenMP's threads briefly, GOMP_SPINCOUNT=1000),
and with its default: the images cached, each batch built in train.py's own process between
steps. Each run in a fresh process, alternating, {args.rounds} rounds; medians.
Machine: {common.machine()}; load average {loads[0]:.1f} before, {loads[1]:.1f} after.
Rerun: {common.rerun()}.

{loader_table}

{train_table}

Where the workers' time goes: one training sample (TrainDataset, in batches of 50) on one thread, for the
generated set and for 200 of its images stored as 512 px photos, before and after a one-time
resize; the model's time per sample is 1 / its samples/s on all cores ({model_us:.0f} us).

{cost_table}

Threads fighting over the cores: the bare loop (fused AdamW, 10 steps) with torch's threads set
three ways, on otherwise idle cores and next to one busy process started by this benchmark (as
a DataLoader worker or another job would be). "Idle" means idle of this benchmark's own
processes: other jobs on the machine count too (see the load average).

{threads_table}

{summary}

- Headroom: the loader alone delivers more than the model consumes (2 workers:
  {headroom}), so train.py waits for data mostly at the start of an epoch. The price
  of the workers is the CPU time they take from the model's threads (the last table: the bare
  loop beside one busy process); from the cache a batch is cheap enough to
  build between steps instead, its data wait is that time.
- Photos: a 512 px JPEG costs {costs["512 px JPEG"] / costs[GENERATED]:.1f}x
  the whole pipeline of a 64 px PNG when it is decoded again every epoch; resized once it costs
  {costs["resized once to 64 px JPEG"] / costs[GENERATED]:.1f}x. train.py decodes each image once
  into its image cache, and tokenises each caption once, when the decoded set fits in a quarter of
  the free memory (the default, `--cache_images`): a sample then costs {costs[CACHED]:.0f} us, {costs[CACHED] / model_us:.2f} of
  the model's time per sample, which is what the workers take from the model's two threads. Beyond
  memory, `python shards.py --to_webdataset SRC OUT --resize 64` writes shards of resized images
  once, and `train.py --data_dir OUT --val_data ...` trains on them.
- Threads: next to one busy process, two threads with OpenMP's default spinning keep
  {busy["2 threads, OpenMP default spinning"]:.2f} of their idle speed, with GOMP_SPINCOUNT=1000
  {busy["2 threads, GOMP_SPINCOUNT=1000"]:.2f}, one thread {busy["1 thread"]:.2f}: a thread
  that waits for a descheduled partner keeps spinning on the core the partner needs. On idle
  cores two threads run {speed["2 threads, GOMP_SPINCOUNT=1000", "idle"] / speed["1 thread", "idle"]:.2f}x
  as fast as one, so two threads that spin briefly is the default to want.
"""


if __name__ == "__main__":
    main()
