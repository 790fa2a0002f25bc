"""Scaling on a CPU: samples/s and peak memory of the training step against batch size and model
size, and what --grad_checkpointing, --patch_dropout 0.5, --precision bf16, --compile and
channels-last (convolutional towers) change.

    .venv/bin/python bench/bench_scaling.py                  # every table; updates bench/README.md
    .venv/bin/python bench/bench_scaling.py --only options --no_readme

Every configuration is the bare loop (common.bare_loop: forward, loss, backward, fused AdamW
step on one batch in memory, with train.py's malloc thresholds) in a fresh process, so its peak
resident memory (the whole process: python and torch count for about 0.5 GiB) is its own. A configuration runs a few untimed warm-up steps
(torch.compile compiles in them; its compile time is shown), then enough timed steps for about
1000 samples (fewer for ViT-B-32 and for an emulated bf16). Options are measured as ratios against the plain step of the
same model and batch, run next to them, in alternating order over the rounds.
"""
import argparse
import statistics

import common

HEADING = "## bench_scaling.py"
BATCHES = (32, 64, 128, 256, 512)
MODELS = (("tiny-vit-64", 64, 16), ("small-vit-128", 64, 6), ("ViT-B-32", 32, 2))
OPTIONS = {  # name -> bare_loop settings that differ from the plain step
    "--grad_checkpointing": {"grad_checkpointing": True},
    "--patch_dropout 0.5": {"patch_dropout": 0.5},
    "--precision bf16": {"precision": "bf16"},
    "--compile": {"compile": True, "warmup": 3},
}
CONV_OPTIONS = {"channels-last": {"channels_last": True}, "--precision bf16": {"precision": "bf16"}}


def bare(**settings):
    settings = {"warmup": 1, "fused": True, "malloc": True, **settings}
    return lambda: common.run_job("bare", settings, log_name="scaling-bare")


def medians(results):
    return (statistics.median(r["samples_per_s"] for r in results),
            statistics.median(r["peak_mib"] for r in results))


def option_rows(model, batch, steps, options, rounds):
    """Each option against the plain step, alternating; rows of a table."""
    sides = {"plain": bare(model_name=model, batch_size=batch, steps=steps)}
    sides.update({name: bare(model_name=model, batch_size=batch, **{"steps": steps, **settings})
                  for name, settings in options.items()})
    runs = common.alternate(sides, rounds, _report)
    plain_speed, plain_peak = medians(runs["plain"])
    rows = [[f"{model}, plain step", f"{plain_speed:.1f}", "1.00", f"{plain_peak:,.0f}", "1.00", ""]]
    for name in options:
        speed, peak = medians(runs[name])
        ratios = [r["samples_per_s"] / p["samples_per_s"] for r, p in zip(runs[name], runs["plain"])]
        warmup = statistics.median(r["warmup_s"] for r in runs[name])
        rows.append([f"{model}, {name}", f"{speed:.1f}", common.median_spread(ratios), f"{peak:,.0f}",
                     f"{peak / plain_peak:.2f}",
                     f"{warmup:.0f}" if name == "--compile" else ""])
    return rows


def _report(name, r, result):
    print(f"  round {r + 1} {name:22}: {result['samples_per_s']:7.1f} samples/s, peak "
          f"{result['peak_mib']:,.0f} MiB (load {common.load_average():.1f})", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="rounds of alternating runs")
    parser.add_argument("--only", choices=("batch", "models", "options"), help="one table only")
    parser.add_argument("--no_readme", action="store_true", help="print the tables only")
    args = parser.parse_args()
    # Without bfloat16 instructions a bf16 step is emulated and ~20x slower: measured on the tiny
    # model alone, over 2 steps, so that the table does not take an hour
    hardware_bf16 = "avx512_bf16" in common.Path("/proc/cpuinfo").read_text()
    load_before = common.load_average()
    tables = {}

    if args.only in (None, "batch"):
        print("batch size (tiny-vit-64, fp32)")
        sides = {b: bare(model_name="tiny-vit-64", batch_size=b, steps=max(2, 1024 // b)) for b in BATCHES}
        runs = common.alternate(sides, args.rounds, _report)
        base_speed, _ = medians(runs[64])
        rows = []
        for b in BATCHES:
            speed, peak = medians(runs[b])
            rows.append([b, f"{speed:.1f}", f"{speed / base_speed:.2f}", f"{peak:,.0f}"])
        tables["batch"] = common.table(["batch", "samples/s", "vs batch 64", "peak RSS (MiB)"], rows)

    if args.only in (None, "models"):
        print("model size (fp32)")
        sides = {m: bare(model_name=m, batch_size=b, steps=s) for m, b, s in MODELS}
        runs = common.alternate(sides, args.rounds, _report)
        rows = []
        for m, b, _ in MODELS:
            speed, peak = medians(runs[m])
            rows.append([m, b, f"{speed:.1f}", f"{1000 / speed:.1f}", f"{peak:,.0f}"])
        tables["models"] = common.table(["model", "batch", "samples/s", "ms per sample",
                                         "peak RSS (MiB)"], rows)

    if args.only in (None, "options"):
        print("options")
        bf16 = "--precision bf16"

        def larger_model(options):   # an emulated bf16 runs on the tiny model alone
            return {k: v for k, v in options.items() if hardware_bf16 or k != bf16}
        tiny = {**OPTIONS, bf16: OPTIONS[bf16] if hardware_bf16 else {**OPTIONS[bf16], "steps": 2, "warmup": 0}}
        rows = option_rows("tiny-vit-64", 64, 16, tiny, args.rounds)
        rows += option_rows("small-vit-128", 64, 6,
                            larger_model({k: v for k, v in OPTIONS.items() if k != "--compile"}), args.rounds)
        rows += option_rows("simple-rn18", 64, 8, larger_model(CONV_OPTIONS), args.rounds)
        tables["options"] = common.table(["model, option", "samples/s", "vs plain, median (range)",
                                          "peak RSS (MiB)", "peak vs plain", "compile (s)"], rows)

    load_after = common.load_average()
    text = "\n\n".join(tables.values())
    print(f"\n{text}")
    if args.no_readme or args.only:
        return
    bf16_note = (", with bfloat16 instructions (avx512_bf16)" if hardware_bf16 else
                 ", without bfloat16 instructions (bf16 is emulated: measured on tiny-vit-64 only, over 2 steps)")
    common.write_readme(HEADING, f"""{HEADING}

The training step on a CPU (the bare loop: forward, loss, backward, fused AdamW step on a batch
in memory, with train.py's malloc thresholds; no data loading), each configuration in a fresh process: samples/s and the peak resident
memory of the whole process (python and torch alone take about 0.5 GiB). First against batch size
(tiny-vit-64, fp32), then against model size (fp32), then the options, each as a ratio to the
plain step of the same model and batch 64 run next to it. {args.rounds} rounds, alternating; medians.
Machine: {common.machine()}{bf16_note}; load average {load_before:.1f} before,
{load_after:.1f} after. Rerun: {common.rerun()}.

{tables["batch"]}

{tables["models"]}

{tables["options"]}
""")


if __name__ == "__main__":
    main()
