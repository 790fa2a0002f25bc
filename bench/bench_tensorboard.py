"""TensorBoard's views (tensorboard_views.py): the share of validation time the pictures take, and
what the pictures and the projector weigh on disk.

    .venv/bin/python bench/bench_tensorboard.py                     # 2 rounds; updates bench/README.md
    .venv/bin/python bench/bench_tensorboard.py --rounds 1 --epochs 2 --no_readme   # a quick look

train.py runs in a fresh process in its default configuration (config.json: tiny-vit-64, batch 64,
fp32 on a CPU, 8 pairs in the pictures, 256 in the projector) on a generated set of 2000 images,
validating at the end of each epoch, with two sizes of validation set: 1 image in 10 held out
(200) and 1 in 2 (1000). The share is measured inside each run, side by side, so that a load that
comes and goes weighs on both parts alike: train.py's own timers give the seconds spent drawing
and writing the pictures (`tensorboard_s`, a part of `validation_s`) and the validation's
seconds. The pictures' cost is the same whatever the set (one batch of 8 pairs, two figures);
the validation's grows with the set, so the share shrinks as the set grows. The first validation
of a run also imports matplotlib and reads the font list, which later ones do not. The projector
is written once, at the end (`tensorboard_end_s`), outside the validations.
"""
import argparse
import shutil
import statistics

import common

HEADING = "## bench_tensorboard.py"
VAL_FRACTIONS = (0.1, 0.5)


def picture_bytes(log_dir) -> int:
    """Bytes of the PNGs of every picture in a run's events, read back by TensorBoard's reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(log_dir), size_guidance={"images": 0}).Reload()
    return sum(len(image.encoded_image_string) for tag in events.Tags()["images"]
               for image in events.Images(tag))


def projector_bytes(log_dir) -> int:
    """Bytes of the projector's files: each step's tensors, metadata and sprite."""
    return sum(path.stat().st_size for path in log_dir.glob("[0-9]*/*/*") if path.is_file())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the runs")
    parser.add_argument("--epochs", type=int, default=3, help="epochs (and validations) of each run")
    parser.add_argument("--num_images", type=int, default=2000, help="images of the generated set")
    parser.add_argument("--repo", default=str(common.REPO), help="repository whose train.py is measured")
    parser.add_argument("--no_readme", action="store_true", help="print the table only")
    args = parser.parse_args()
    repo = common.Path(args.repo)
    data = common.sample_data(args.num_images) / "data.json"

    def run(fraction):
        def measured():
            argv = common.train_argv(data, "--num_epochs", args.epochs, "--val_fraction", fraction,
                                     repo=repo)
            result = common.run_job("train", {"argv": argv}, repo=repo, log_name="tensorboard-train")
            log_dir = common.OUT / "runs" / "logs" / argv[argv.index("--run_name") + 1]
            shutil.rmtree(result["checkpoint_dir"], ignore_errors=True)   # ~100 MB each, not needed
            return {**result["timing"], "validations": result["validations"],
                    "picture_bytes": picture_bytes(log_dir), "projector_bytes": projector_bytes(log_dir)}
        return measured

    def report(name, r, result):
        print(f"round {r + 1}, {name} validation images: pictures {result['tensorboard_s']:.1f} s "
              f"of {result['validation_s']:.1f} s of validation (load {common.load_average():.1f})",
              flush=True)

    load_before = common.load_average()
    sides = {str(round(args.num_images * f)): run(f) for f in VAL_FRACTIONS}
    runs = common.alternate(sides, args.rounds, report)
    load_after = common.load_average()
    def median(results, key, per_validation=False):
        return statistics.median(r[key] / (r["validations"] if per_validation else 1) for r in results)
    rows = []
    for name, results in runs.items():
        shares = [r["tensorboard_s"] / r["validation_s"] for r in results]
        rows.append([name, results[0]["validations"], f"{median(results, 'validation_s', True):.2f}",
                     f"{median(results, 'tensorboard_s', True):.2f}", common.median_spread(shares),
                     f"{median(results, 'tensorboard_end_s'):.2f}",
                     f"{median(results, 'picture_bytes', True) / 1024:.0f}",
                     f"{median(results, 'projector_bytes') / 2**20:.1f}"])
    table = common.table(["validation images", "validations per run", "validation (s each)",
                          "pictures (s each)", "pictures' share of validation",
                          "projector at the end (s)", "pictures (KiB per validation)",
                          "projector (MiB)"], rows)
    print(f"\n{table}")
    if args.no_readme:
        return
    common.write_readme(HEADING, f"""{HEADING}

The share of validation time TensorBoard's pictures take (`tensorboard_views.py`: a similarity
heatmap and retrieval examples of the same 8 validation pairs at every validation), and what the
views weigh. `train.py` in its default configuration ({args.epochs} epochs of a generated set of
{args.num_images} images, validated at the end of each epoch), with 1 image in 10 or 1 in 2 held
out for validation; the share is measured inside each run by train.py's timers (the pictures'
`tensorboard_s` over `validation_s`, which holds it), median and range over {args.rounds} rounds
of fresh processes, the two sizes alternating. The first validation of a run also imports
matplotlib. The projector (256 pairs, 2 x 256 points) is written once, at the end. Machine:
{common.machine()}; load average {load_before:.1f} before, {load_after:.1f} after.
Rerun: {common.rerun()}.

{table}
""")


if __name__ == "__main__":
    main()
