"""Time and peak memory of evaluation.py's metrics from saved embeddings, 1,000 to 100,000 images.

    .venv/bin/python bench/bench_evaluation.py                       # every size; updates bench/README.md
    .venv/bin/python bench/bench_evaluation.py --sizes 1000 3000 --no_readme     # a quick look

For each size N the benchmark saves N image and 5N caption embeddings (random, D=512, each caption
a noisy copy of its image so the recalls are neither 0 nor 100) with evaluation.save_embeddings,
then runs `--worker DIR` in a fresh process: load them (evaluation.load_embeddings) and compute
retrieval and similarity metrics (evaluation.evaluate_features), the work of
`python evaluation.py --embeddings DIR`. The peak resident memory of that process (ru_maxrss from
os.wait4) counts everything, torch's buffers included, which tracemalloc would not see. A process
that only imports torch and evaluation gives the baseline to subtract.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import common

BENCH, REPO = common.BENCH, common.REPO
HEADING = "## bench_evaluation.py"


def make_embeddings(directory: Path, num_images: int, captions_per_image: int, dim: int, seed: int = 0):
    """Random unit image vectors; each caption = its image + noise, normalised (cosine ~0.2)."""
    sys.path.insert(0, str(REPO))
    import evaluation
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((num_images, dim), dtype=np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    owner = np.repeat(np.arange(num_images, dtype=np.int64), captions_per_image)
    texts = rng.standard_normal((len(owner), dim), dtype=np.float32)
    texts *= 4.5 / np.sqrt(dim)
    texts += images[owner]
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    meta = {"image_names": [f"image_{i}" for i in range(num_images)],
            "captions": [f"caption {j}" for j in range(len(owner))], "data": "random", "checkpoint": None}
    evaluation.save_embeddings(directory, images, texts, owner, meta)


def worker(directory: str, chunk_size: int, threads: int):
    """Runs in the measured process: load saved embeddings and evaluate them, print timings."""
    import torch
    torch.set_num_threads(threads)
    sys.path.insert(0, str(REPO))
    import evaluation
    if directory == "none":  # the baseline: imports only
        print(json.dumps({}))
        return
    started = time.perf_counter()
    saved = evaluation.load_embeddings(directory)
    loaded = time.perf_counter()
    results = evaluation.evaluate_features(saved["image_features"], saved["text_features"],
                                           saved["caption_image"], chunk_size)
    print(json.dumps({"load_s": loaded - started, "metrics_s": time.perf_counter() - loaded, **results}))


def measure(directory, chunk_size: int, threads: int) -> dict:
    """Run a worker in a fresh process; its output plus its peak resident memory in MiB."""
    process = subprocess.Popen([sys.executable, __file__, "--worker", str(directory),
                                "--chunk_size", str(chunk_size), "--threads", str(threads)],
                               stdout=subprocess.PIPE, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        sys.exit(f"worker for {directory} failed with exit code {process.returncode}")
    return {**json.loads(output), "peak_mib": usage.ru_maxrss / 1024}  # ru_maxrss is in KiB on Linux


def table(rows, baseline_mib: float, dim: int) -> str:
    lines = ["| images | captions | load (s) | metrics (s) | ns per pair | peak RSS (MiB) | "
             "above baseline (MiB) | KiB per image | float32 embeddings (MiB) | full N x M matrix (GiB) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        n, m = r["num_images"], r["num_texts"]
        above = r["peak_mib"] - baseline_mib
        lines.append(f"| {n:,} | {m:,} | {r['load_s']:.1f} | {r['metrics_s']:.1f} | "
                     f"{r['metrics_s'] / (n * m) * 1e9:.1f} | {r['peak_mib']:,.0f} | {above:,.0f} | "
                     f"{above * 1024 / n:.1f} | {(n + m) * dim * 4 / 2**20:,.0f} | {n * m * 4 / 2**30:,.1f} |")
    return "\n".join(lines)


def readme_section(result: str, baseline_mib: float, args, cpu: str, torch_version: str, load) -> str:
    per_image_kib = (1 + args.captions_per_image) * args.dim * (4 + 8) / 1024
    threads_note = "" if args.threads >= os.cpu_count() else (
        f"\n- Torch threads: {args.threads} of {os.cpu_count()} cores, because other jobs were using "
        f"the cores: then every\n  multi-threaded torch operation waits for its descheduled thread, "
        f"and in a test one thread ran 3-4x\n  faster than two. On an idle machine try "
        f"`--threads {os.cpu_count()}`.")
    return f"""{HEADING}

Retrieval and similarity metrics of `evaluation.py` from saved embeddings (what
`python evaluation.py --embeddings DIR` computes) for N images with {args.captions_per_image} captions
each, D = {args.dim}, `--chunk_size {args.chunk_size}`, torch threads: {args.threads}, each size in a
fresh process. Machine: {os.cpu_count()} cores ({cpu}), torch {torch_version}; load average
{load[0]:.1f} before the run and {load[1]:.1f} after (other jobs shared the cores).
Peak RSS is the whole process; the baseline (python, torch and evaluation imported) is
{baseline_mib:.0f} MiB. Rerun: `.venv/bin/python bench/bench_evaluation.py`.

{result}

- Memory is linear in N. Once the per-image part outweighs the fixed part (tile buffers,
  allocator slack and the run-to-run wobble of the baseline, a few tens of MiB), the KiB per
  image above the baseline level off at the predicted value: the saved float32 embeddings plus
  their float64 copies on the exact grid, (1 + {args.captions_per_image}) x {args.dim} x (4 + 8) bytes = {per_image_kib:.0f} KiB
  per image. One {args.chunk_size} x {args.chunk_size} float64 tile ({args.chunk_size ** 2 * 8 / 2**20:.0f} MiB) is all the score matrix
  ever occupies; the last column is what the full matrix would need.
- Time grows with N x M, as it must: every caption is compared with every image once (one tile
  serves both directions). The constant ns per pair is the float64 matrix multiply (2 D flops a
  pair) plus the counting; float64 keeps the scores exact (see GRID in evaluation.py).{threads_note}
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 3000, 10000, 30000, 100000],
                        help="numbers of images to measure")
    parser.add_argument("--captions_per_image", type=int, default=5, help="captions of each image")
    parser.add_argument("--dim", type=int, default=512, help="embedding dimension (ViT-B-32: 512)")
    parser.add_argument("--chunk_size", type=int, default=1024, help="evaluation.py --chunk_size")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of the worker")
    parser.add_argument("--out_dir", default=str(BENCH / "out" / "evaluation"),
                        help="where the embeddings are saved (kept for reruns; bench/out/ is not in git)")
    parser.add_argument("--no_readme", action="store_true", help="print the table only")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.chunk_size, args.threads)

    load_before = os.getloadavg()
    baseline = measure("none", args.chunk_size, args.threads)["peak_mib"]
    rows = []
    for n in args.sizes:
        directory = Path(args.out_dir) / f"N{n}_C{args.captions_per_image}_D{args.dim}"
        if not (directory / "meta.json").exists():
            make_embeddings(directory, n, args.captions_per_image, args.dim)
        rows.append(measure(directory, args.chunk_size, args.threads))
        r = rows[-1]
        print(f"{n:>7} images: load {r['load_s']:.1f} s, metrics {r['metrics_s']:.1f} s, "
              f"peak {r['peak_mib']:.0f} MiB, rsum {r['retrieval']['rsum']:.1f}", flush=True)
    result = table(rows, baseline, args.dim)
    print(f"\nbaseline (python + torch + evaluation imported): {baseline:.0f} MiB\n{result}")
    if args.no_readme:
        return
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    import torch
    common.write_readme(HEADING, readme_section(result, baseline, args, cpu, torch.__version__,
                                                (load_before[0], os.getloadavg()[0])))


if __name__ == "__main__":
    main()
