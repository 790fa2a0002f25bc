"""Speed of the exported encoders: PyTorch eager against ONNX Runtime fp32 and int8, on the CPU.

    .venv/bin/python bench/bench_export.py                    # tiny-vit-64 and ViT-B-32; updates bench/README.md
    .venv/bin/python bench/bench_export.py --quick --no_readme    # tiny-vit-64, one short round: a smoke test

For each model (random weights: speed does not depend on them) the benchmark saves a checkpoint
and exports it with export.py's own functions (export_onnx, quantize_int8) into
bench/out/export/MODEL/, and checks once that ONNX Runtime's fp32 features match PyTorch's on the
benchmark's inputs. Then each runtime is measured in a fresh process of its own (`--worker`), so
that one runtime's idle threads (onnxruntime's spin-waiting ones) never steal the cores of
another: both encoders, batch 1 (latency of single requests: p50 and p95 over all timed calls)
and batch 64 (throughput). Both runtimes get the same number of threads. Rounds alternate the
order of the runtimes (A B C, C B A, ...), and the "x PyTorch" columns are medians of the ratios
of each round, with their range, so that a load that drifts over the run affects all alike.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common

HEADING = "## bench_export.py"
RUNTIMES = ("pytorch", "onnx_fp32", "onnx_int8")
LABELS = {"pytorch": "PyTorch eager", "onnx_fp32": "ONNX Runtime fp32", "onnx_int8": "ONNX Runtime int8"}
CAPTIONS = ["a large red circle on the left", "a small blue square and a green star at the top"]


def prepare(model_name, folder: Path):
    """A random-weight checkpoint of model_name and its ONNX fp32 and int8 encoders in folder,
    made once; the fp32 encoders are checked against PyTorch on this benchmark's inputs."""
    sys.path.insert(0, str(common.REPO))
    import torch

    import clip_model
    import export
    if (folder / "done").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    clip_model.save_checkpoint(folder / "model.pt", clip_model.build_model(model_name), step=0)
    setup, _ = clip_model.model_from_checkpoint(folder / "model.pt")
    files = export.export_onnx(setup, folder, export.DEFAULT_OPSET)
    export.quantize_int8(folder, files)
    onnx = export.OnnxModel(files["image"], files["text"])
    pixels, tokens = inputs(setup, 4)
    with torch.inference_mode():
        for ours, theirs in ((setup.model.encode_image(pixels, normalize=True), onnx.encode_image(pixels)),
                             (setup.model.encode_text(tokens, normalize=True), onnx.encode_text(tokens))):
            difference = float((ours - theirs).abs().max())
            if difference > 1e-4:
                sys.exit(f"{model_name}: ONNX features differ from PyTorch's by {difference}")
    (folder / "done").write_text("")


def inputs(setup, batch):
    """Normalised random pixels [batch, 3, H, W] and the tokens of real captions [batch, L]."""
    import torch

    import export
    pixels = torch.randn(batch, 3, *export.image_size(setup.preprocess_cfg),
                         generator=torch.Generator().manual_seed(0))
    return pixels, setup.tokenizer([CAPTIONS[i % len(CAPTIONS)] for i in range(batch)])


def worker(params: dict) -> dict:
    """Runs in the measured process: seconds of each timed call, per encoder and batch size."""
    import torch
    torch.set_num_threads(params["threads"])
    sys.path.insert(0, str(common.REPO))
    import clip_model
    import export
    folder, runtime = Path(params["folder"]), params["runtime"]
    setup, _ = clip_model.model_from_checkpoint(folder / "model.pt")
    if runtime == "pytorch":
        model = setup.model.eval()
        encoders = {"image": lambda x: model.encode_image(x, normalize=True),
                    "text": lambda x: model.encode_text(x, normalize=True)}
    else:
        import onnxruntime
        names = export.INT8_FILES if runtime == "onnx_int8" else export.ONNX_FILES
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = params["threads"], 1
        sessions = {tower: onnxruntime.InferenceSession(str(folder / name), options,
                                                        providers=["CPUExecutionProvider"])
                    for tower, name in names.items()}
        encoders = {"image": lambda x: sessions["image"].run(None, {"pixels": x.numpy()}),
                    "text": lambda x: sessions["text"].run(None, {"tokens": x.numpy()})}
    times = {}
    for batch, calls in ((1, params["calls_batch1"]), (64, params["calls_batch64"])):
        pixels, tokens = inputs(setup, batch)
        for tower, x in (("image", pixels), ("text", tokens)):
            with torch.inference_mode():
                for _ in range(params["warmup"]):
                    encoders[tower](x)
                seconds = []
                for _ in range(calls):
                    started = time.perf_counter()
                    encoders[tower](x)
                    seconds.append(time.perf_counter() - started)
            times[f"{tower}/{batch}"] = seconds
    return times


def measure(runtime, folder, args) -> dict:
    params = {"runtime": runtime, "folder": str(folder), "threads": args.threads,
              "calls_batch1": args.calls_batch1, "calls_batch64": args.calls_batch64, "warmup": 3}
    result = subprocess.run([sys.executable, __file__, "--worker", json.dumps(params)],
                            capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"worker {runtime} {folder.name} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def rows_of(model_name, runs, sizes) -> list:
    """Table rows of one model: per encoder and runtime, batch-1 latency, batch-64 throughput,
    and both as a multiple of PyTorch's speed (median of the rounds' ratios, with the range)."""
    rows, fp32_batch1 = [], {}
    for tower, unit in (("image", "images/s"), ("text", "texts/s")):
        for runtime in RUNTIMES:
            latencies = [s for r in runs[runtime] for s in r[f"{tower}/1"]]
            throughput = [64 / statistics.median(r[f"{tower}/64"]) for r in runs[runtime]]
            speedups = []
            for batch in (1, 64):
                ratios = [statistics.median(p[f"{tower}/{batch}"]) / statistics.median(r[f"{tower}/{batch}"])
                          for p, r in zip(runs["pytorch"], runs[runtime])]
                speedups.append(common.median_spread(ratios))
                if runtime == "onnx_fp32" and batch == 1:
                    fp32_batch1[f"{model_name} {tower}"] = statistics.median(ratios)
            file = "" if runtime == "pytorch" else f"{sizes[runtime][tower] / 2**20:.1f}"
            rows.append([f"{model_name} {tower}", LABELS[runtime],
                         f"{1000 * percentile(latencies, 50):.1f}", f"{1000 * percentile(latencies, 95):.1f}",
                         f"{1 / percentile(latencies, 50):,.0f}", speedups[0],
                         f"{statistics.median(throughput):,.0f} {unit}", speedups[1], file])
    return rows, fp32_batch1


def verdict(fp32_batch1: dict) -> str:
    """Issue 15's target in a sentence: ONNX Runtime fp32 at least as fast as PyTorch at batch 1."""
    slower = [name for name, ratio in fp32_batch1.items() if ratio < 1]
    ratios = sorted(fp32_batch1.values())
    return ("Target, ONNX Runtime fp32 at least as fast as PyTorch at batch 1: "
            + (f"met for every encoder ({ratios[0]:.2f}x to {ratios[-1]:.2f}x)." if not slower
               else f"NOT met for {', '.join(slower)}."))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-vit-64", "ViT-B-32"], help="open_clip models or presets")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of all runtimes, alternating")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of both runtimes")
    parser.add_argument("--calls_batch1", type=int, default=100, help="timed calls at batch 1, per round")
    parser.add_argument("--calls_batch64", type=int, default=5, help="timed calls at batch 64, per round")
    parser.add_argument("--quick", action="store_true", help="tiny-vit-64, 1 round, few calls: a smoke test")
    parser.add_argument("--no_readme", action="store_true", help="print the table only")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.quick:
        args.models, args.rounds, args.calls_batch1, args.calls_batch64 = ["tiny-vit-64"], 1, 10, 2
    load_before, rows, fp32_batch1 = common.load_average(), [], {}
    for model_name in args.models:
        folder = common.OUT / "export" / model_name
        print(f"{model_name}: exporting to {folder}", flush=True)
        prepare(model_name, folder)
        runs = common.alternate({runtime: (lambda runtime=runtime, folder=folder: measure(runtime, folder, args))
                                 for runtime in RUNTIMES}, args.rounds,
                                lambda name, r, _: print(f"  round {r + 1} {name} done", flush=True))
        sizes = {"onnx_fp32": {t: (folder / f"{t}_encoder.onnx").stat().st_size for t in ("image", "text")},
                 "onnx_int8": {t: (folder / f"{t}_encoder.int8.onnx").stat().st_size for t in ("image", "text")}}
        model_rows, model_fp32 = rows_of(model_name, runs, sizes)
        rows, fp32_batch1 = rows + model_rows, {**fp32_batch1, **model_fp32}
    result = common.table(["model, encoder", "runtime", "batch 1 p50 (ms)", "p95 (ms)", "items/s",
                           "x PyTorch", "batch 64", "x PyTorch", "file (MiB)"], rows)
    print(f"\n{result}\n\n{verdict(fp32_batch1)}")
    if args.no_readme:
        return
    common.write_readme(HEADING, f"""{HEADING}

The encoders that `export.py` writes, on this machine's CPU: PyTorch eager (`model.encode_image`
and `encode_text`, inference mode) against ONNX Runtime with the fp32 and the dynamically
quantised int8 files, random weights. Batch 1: latency of single requests (p50 and p95 over all
timed calls, {args.calls_batch1} per round) and the items/s it allows; batch 64: items/s
(median call of {args.calls_batch64} per round). Each runtime in a fresh process, {args.threads}
threads each, {args.rounds} rounds in alternating order; "x PyTorch" is the median of the rounds'
speed ratios (range). Machine: {common.machine()}; load average {load_before:.1f} before,
{common.load_average():.1f} after. Rerun: {common.rerun()}.

{result}

{verdict(fp32_batch1)} int8 (dynamic quantisation: weights in int8, activations quantised on the fly)
pays where the matrix multiplies are large (ViT-B-32, batch 64) and can lose to fp32 on a tiny model at
batch 1, where quantising the activations costs more than it saves; its files are about a quarter of the
size. export.py's report gives its change of recall on your data.
""")


if __name__ == "__main__":
    main()
