"""Fine-tuning methods of issue 18, each measured: hard-negative batches, the moving average of
the weights (EMA), and weight-space interpolation (WiSE-FT).

    .venv/bin/python bench/bench_finetune.py                 # seeds 0 1 2; updates bench/README.md
    .venv/bin/python bench/bench_finetune.py --quick --no_readme       # a smoke run

Recall at equal steps, so the load of the machine does not change the figures (only the time it
takes); every run is a fresh process (common.run_job).

Hard negatives and EMA. The tiny preset trains from scratch on a generated set (2000 images, 2-3
captions each) with and without --hard_negatives 0.5, the same steps and seeds, every run with
--ema_decay 0.99 (the average changes nothing in training: it is only validated and saved). Each
final model is evaluated on a fine-grained set of near-twins (sample_data.create_fine_grained_set:
families of four images whose captions differ in one word: the colour, the shape or the
position), where telling an image from its twins is the whole task. Reported: R@1 both ways,
mean and spread over the seeds, the paired gain, and the mining time's share of the loop.

WiSE-FT. A model is pretrained on shapes of three colours (red, green, blue), then fine-tuned on
a shifted distribution: shapes of the two other colours (yellow, purple), which the pretraining
never named. wise_ft.py mixes the two sets of weights; each mix is evaluated on the fine-tuning
task (retrieval on held-out yellow/purple images) and on what the pretraining knew (zero-shot
over the 12 red/green/blue classes).
"""
import argparse
import json
import statistics
import subprocess
import sys

import common

sys.path.insert(0, str(common.REPO))
import sample_data  # noqa: E402  (the repository's module, found through the path set above)

HEADING = "## bench_finetune.py"
TRAIN = ["--model_name", "tiny-vit-64", "--batch_size", "64", "--learning_rate", "1e-3", "--warmup_steps", "30",
         "--eval_every", "100000", "--num_workers", "2", "--save_every", "100000"]


def data_set(name, make):
    folder = common.OUT / "data" / name
    if not folder.exists():
        make(folder)
    return folder


def generated(name, num_samples, seed, colours=None):
    options = {"colours": colours} if colours else {}
    return data_set(name, lambda folder: sample_data.create_sample_dataset(folder, num_samples, seed, **options))


def run(data, val, eval_set, *flags):
    argv = common.train_argv(data / "data.json", "--val_data", val / "data.json", *TRAIN, *flags)
    return common.run_job("train_eval", {"argv": argv, "eval": str(eval_set)}, log_name="finetune")


def hard_negatives(seeds, epochs):
    train_set, val = generated("shapes-2000-seed0", 2000, 0), generated("shapes-200-seed1", 200, 1)
    fine = data_set("fine-grained-100", lambda folder: sample_data.create_fine_grained_set(folder, 100, 7))
    runs = {share: [run(train_set, val, fine / "data.json", "--num_epochs", epochs, "--seed", seed,
                        "--hard_negatives", share, "--ema_decay", "0.99") for seed in seeds]
            for share in ("0", "0.5")}
    rows = []
    for share, label in (("0", "random batches"), ("0.5", "--hard_negatives 0.5")):
        for weights in ("raw", "ema"):
            t2i = [r[weights]["text_to_image"]["R@1"] for r in runs[share]]
            i2t = [r[weights]["image_to_text"]["R@1"] for r in runs[share]]
            rows.append([label, "EMA 0.99" if weights == "ema" else "weights", spread(t2i), spread(i2t)])
    gains = [h["raw"]["text_to_image"]["R@1"] - r["raw"]["text_to_image"]["R@1"]
             for h, r in zip(runs["0.5"], runs["0"])]
    ema_gains = [r["ema"]["text_to_image"]["R@1"] - r["raw"]["text_to_image"]["R@1"] for r in runs["0"]]
    mining = [r["timing"]["mining_s"] / r["timing"]["loop_s"] for r in runs["0.5"]]
    return rows, gains, ema_gains, mining


def spread(values):
    mean = statistics.mean(values)
    half = (max(values) - min(values)) / 2
    return f"{mean:.1f} ± {half:.1f}"


def wise_ft(epochs):
    pretrain = generated("rgb-2000-seed0", 2000, 0, ("red", "green", "blue"))
    pretrain_val = generated("rgb-200-seed1", 200, 1, ("red", "green", "blue"))
    shifted = generated("yp-1000-seed2", 1000, 2, ("yellow", "purple"))
    shifted_val = generated("yp-200-seed3", 200, 3, ("yellow", "purple"))
    base = run(pretrain, pretrain_val, shifted_val / "data.json", "--num_epochs", epochs)
    tuned = run(shifted, shifted_val, shifted_val / "data.json", "--num_epochs", epochs,
                "--pretrained", base["checkpoint"], "--learning_rate", "3e-4", "--warmup_steps", "10")
    output = common.OUT / "runs" / "wise_ft.json"
    subprocess.run([sys.executable, str(common.REPO / "wise_ft.py"), base["checkpoint"], tuned["checkpoint"],
                    "--alpha", "0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1", "--data", str(shifted_val / "data.json"),
                    "--zeroshot", str(pretrain_val / "zeroshot"), "--output", str(output), "--num_workers", "2"],
                   check=True, cwd=common.OUT, stdout=subprocess.DEVNULL)
    results = json.loads(output.read_text())["results"]
    return [[f"{r['alpha']:.1f}", f"{r['retrieval']['mean_recall']:.1f}", f"{r['retrieval']['text_to_image']['R@1']:.1f}",
             f"{r['zeroshot']['top1']:.1f}"] for r in results], output.with_suffix(".png")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=5, help="epochs of every run")
    parser.add_argument("--quick", action="store_true", help="one seed, one epoch: a smoke run")
    parser.add_argument("--no_readme", action="store_true", help="print the tables only")
    args = parser.parse_args()
    seeds, epochs = ([0], 1) if args.quick else (args.seeds, args.epochs)
    rows, gains, ema_gains, mining = hard_negatives(seeds, epochs)
    hard_table = common.table(["batches", "weights", "text->image R@1", "image->text R@1"], rows)
    wise_rows, curve = wise_ft(epochs)
    wise_table = common.table(["alpha", "task mean recall", "task text->image R@1", "zero-shot top-1 (12 classes)"],
                              wise_rows)
    summary = (f"Hard negatives, paired gain in text->image R@1 over random batches: "
               f"{', '.join(f'{g:+.1f}' for g in gains)} (seeds {', '.join(map(str, seeds))}); "
               f"EMA over the weights with random batches: {', '.join(f'{g:+.1f}' for g in ema_gains)}; "
               f"mining took {100 * statistics.mean(mining):.1f}% of the loop's time.")
    print(f"\n{hard_table}\n\n{wise_table}\n\n{summary}")
    if args.no_readme:
        return
    common.write_readme(HEADING, f"""{HEADING}

{__doc__.split(chr(10) + chr(10), 2)[2].strip()}

Rerun: {common.rerun()} ({len(seeds)} seeds, {epochs} epochs of 31 steps
at batch 64). Machine: {common.machine()}.

Fine-grained retrieval (400 near-twin images, chance R@1 0.25%), mean ± half the range over the
seeds:

{hard_table}

{summary}

WiSE-FT (alpha 0 = pretrained on red/green/blue, 1 = fine-tuned on yellow/purple; the curve is
{curve.name} under bench/out/runs):

{wise_table}
""")


if __name__ == "__main__":
    main()
