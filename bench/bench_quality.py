"""Held-out recall at equal wall time: train.py and open_clip's trainer on real data, and which of
train.py's defaults cost recall at equal steps.

    .venv/bin/python bench/bench_quality.py                    # seeds 0 and 1; updates bench/README.md
    .venv/bin/python bench/bench_quality.py --recipes 0 2      # only these train.py recipes
    .venv/bin/python bench/bench_quality.py --quick --no_readme          # a smoke run (minutes)
    .venv/bin/python bench/bench_quality.py --ablations --seeds 0 1 2    # recall at equal steps

Data: the clip-art set of bench/clipart.py (Debian's openclipart-png; about 4,500 training images
with 2-4 noisy captions each, validation and test images from the same category folders).
train.py reads train/data.json and validates on val/data.json; open_clip_train reads the same
images as train/data.csv (one row per caption) and validates on val/data.csv. Both see the same
RGB pixels (clipart.py explains why the images are converted once).

Shared settings (issue 13): the tiny-vit-64 preset (open_clip_train sees it because the job
registers model_configs/ with open_clip.add_model_config), batch 128, fp32, 2 DataLoader workers,
learning rate 1e-3, warmup 100 steps. Everything else is each trainer's default: its
augmentation, caption sampling, weight decay, clipping, validation after every epoch, checkpoints.

Equal wall time (issue 32). For each seed open_clip_train trains EPOCHS epochs (an epoch is
every caption row once); its wall time, from the start of its process to its return, becomes
train.py's `--time_budget` for each of BUDGET_RECIPES (train.py then plans its own steps). A run is
a fresh process (common._job_snapshots) that copies the model's weights every `every` optimiser
steps with torch's global optimizer hook, so neither trainer is changed; a copy records the
seconds since the process started (the copies' own time left out). After the runs, every copy,
and train.py's best.pt and last.pt, are evaluated by the same code, our
evaluation.evaluate_model on the test split. The copies fall on train.py's validations, so the
checkpoint each rule of choosing would keep can be scored on the test split too. Timings are
only meaningful on a quiet machine.

Ablations (--ablations): recall at equal steps, so the load of the machine does not matter (use
--threads 1 on a busy machine: one torch thread per run is then faster). Each row changes
train.py's defaults (the augmentation's strength, or one choice of open_clip_train's), with the
same steps and seeds; the delta is paired by seed against train.py's defaults.

open_clip_train needs pandas and braceexpand, which open_clip_torch does not install:
`pip install pandas braceexpand`.
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import clipart

import common

HEADING = "## bench_quality.py"
SHARED = {"model": "tiny-vit-64", "batch": 128, "precision": "fp32", "workers": 2, "lr": 1e-3,
          "warmup": 100}
EPOCHS = 3            # open_clip_train's epochs (of caption rows); ablations: train.py gets the same steps
PLOT = common.BENCH / "bench_quality.png"


@dataclass(frozen=True)
class Recipe:
    """A way of training: a trainer with its defaults, changed by flags, or train.py fed one
    image per caption row (what open_clip_train iterates)."""
    trainer: str                                   # "train.py" or "open_clip_train"
    flags: tuple = ()
    caption_rows: bool = False


def ours(*flags) -> Recipe:
    return Recipe("train.py", flags=flags)


OURS, THEIRS = ours(), Recipe("open_clip_train")
ABLATIONS = {
    "train.py defaults": OURS,
    "crops 80-100%": ours("--crop_min_scale", 0.8),
    "crops 50-100%": ours("--crop_min_scale", 0.5),
    "colour jitter on 80% of images": ours("--colour_jitter", 0.8),
    "crops 80-100%, colour jitter on 80% (the defaults until 2026-12-06)":
        ours("--crop_min_scale", 0.8, "--colour_jitter", 0.8),
    "crops 50-100%, colour jitter on 80%": ours("--crop_min_scale", 0.5, "--colour_jitter", 0.8),
    "no augmentation": ours("--no-augment"),
    "caption rows as separate images (two of one image are negatives), as open_clip_train":
        Recipe("train.py", caption_rows=True),
    "weight decay 0.2, as open_clip_train": ours("--weight_decay", 0.2),
    "no gradient clipping, as open_clip_train": ours("--grad_clip_norm", 0.0),
    "open_clip_train defaults": THEIRS,
    "each image once per epoch, with one drawn caption (--sample_by image)": ours("--sample_by", "image"),
    "sigmoid loss (--loss siglip)": ours("--loss", "siglip"),
    "half of each batch in groups of similar items (--hard_negatives 0.5)": ours("--hard_negatives", 0.5),
}


# train.py's ways of spending open_clip_train's wall time (--time_budget), for the comparison.
# FLIP (Li et al. 2023): drop a share of the image patches, so each step is cheaper and more
# steps fit; optionally see every patch again for the last steps (its "unmasked tuning").
BUDGET_RECIPES = {
    "train.py defaults": OURS,
    "patch dropout 0.25": ours("--patch_dropout", 0.25),
    "patch dropout 0.5": ours("--patch_dropout", 0.5),
    "patch dropout 0.25, last 10% of steps unmasked": ours("--patch_dropout", 0.25, "--patch_dropout_tail", 0.1),
    "patch dropout 0.5, last 10% of steps unmasked": ours("--patch_dropout", 0.5, "--patch_dropout_tail", 0.1),
    "batch 256": ours("--batch_size", 256),
    "batch 256, patch dropout 0.5": ours("--batch_size", 256, "--patch_dropout", 0.5),
    "patch dropout 0.75": ours("--patch_dropout", 0.75),
}


# ----------------------------------------------------------------------------------------------
# Data

@dataclass
class Data:
    train: Path        # folder with data.json and data.csv
    val: Path
    test: Path
    images: int        # training images: train.py's epoch
    rows: int          # caption rows of train/data.csv: open_clip_train's epoch


def training_subset(train: Path, num_images: int) -> Path:
    """The first num_images images of a split (with all their captions), as a split folder."""
    folder = train.with_name(f"{train.name}-{num_images}")
    if not (folder / "data.json").is_file():
        entries = json.loads((train / "data.json").read_text(encoding="utf-8"))[:num_images]
        clipart.write_split(folder, [{"file": Path(e["image_path"]).name, "captions": e["captions"]}
                                     for e in entries])
    return folder


def caption_rows(train: Path) -> Path:
    """train/ as one image per caption: each row's image is a hard link of its own (no copy),
    so train.py, which merges captions of the same image file, sees what open_clip_train
    iterates: every (image, caption) row once per epoch, rows of one image as strangers."""
    folder = train.with_name(f"{train.name}-rows")
    if not (folder / "data.json").is_file():
        (folder / "links").mkdir(parents=True, exist_ok=True)
        rows = []
        for entry in json.loads((train / "data.json").read_text(encoding="utf-8")):
            image = (train / entry["image_path"]).resolve()
            for k, caption in enumerate(entry["captions"]):
                link = folder / "links" / f"{image.stem}-{k}{image.suffix}"
                if not link.exists():
                    os.link(image, link)
                rows.append({"image_path": f"links/{link.name}", "caption": caption})
        (folder / "data.json").write_text(json.dumps(rows, ensure_ascii=False, indent=0), encoding="utf-8")
    return folder


def prepare_data(args) -> Data:
    root = clipart.build(size=args.image_size, seed=args.data_seed)
    train = training_subset(root / "train", args.train_images) if args.train_images else root / "train"
    images = len(json.loads((train / "data.json").read_text(encoding="utf-8")))
    rows = sum(1 for _ in open(train / "data.csv", encoding="utf-8")) - 1
    return Data(train, root / "val", root / "test", images, rows)


# ----------------------------------------------------------------------------------------------
# Training runs

def ours_argv(data: Data, recipe: Recipe, steps: int, seed: int, validate: bool, budget_s: float = None) -> list:
    """train.py's flags: the shared settings, the recipe's changes; without `validate` it
    validates once, at the end (recall at equal steps does not need more). With budget_s it
    trains for that time (--time_budget) instead of `steps`."""
    train = caption_rows(data.train) if recipe.caption_rows else data.train
    length = ("--time_budget", f"{budget_s:.2f}s") if budget_s else ("--max_steps", steps)
    return common.train_argv(
        train, "--val_data", data.val, "--model_name", SHARED["model"], "--batch_size", SHARED["batch"],
        "--precision", SHARED["precision"], "--num_workers", SHARED["workers"],
        "--learning_rate", SHARED["lr"], "--warmup_steps", SHARED["warmup"], *length,
        "--seed", seed, *(() if validate else ("--eval_every", steps)), *recipe.flags)


def theirs_argv(data: Data, recipe: Recipe, epochs: int, seed: int, validate: bool, logs: Path) -> list:
    """open_clip_train's flags: the shared settings, the recipe's changes, its logs in logs/."""
    return ["--train-data", str(data.train / "data.csv"),
            *(("--val-data", str(data.val / "data.csv")) if validate else ()),
            "--csv-separator", ",", "--csv-img-key", "filepath", "--csv-caption-key", "title",
            "--model", SHARED["model"], "--batch-size", str(SHARED["batch"]),
            "--precision", SHARED["precision"], "--workers", str(SHARED["workers"]),
            "--lr", str(SHARED["lr"]), "--warmup", str(SHARED["warmup"]), "--epochs", str(epochs),
            "--seed", str(seed), "--device", "cpu", "--logs", str(logs.parent), "--name", logs.name,
            *map(str, recipe.flags)]


def train(recipe: Recipe, data: Data, label: str, epochs: int, every: int, seed: int = 0,
          validate: bool = True, budget_s: float = None) -> dict:
    """One run in a fresh process, its weights copied every `every` steps (common._job_snapshots);
    the trainer's own checkpoints and logs are deleted afterwards, but for train.py's best.pt and
    last.pt (kept as `checkpoints` to be evaluated) and its validations."""
    steps = epochs * (data.rows // SHARED["batch"])
    out = common.OUT / "quality" / label
    shutil.rmtree(out, ignore_errors=True)
    if recipe.trainer == "train.py":
        argv = ours_argv(data, recipe, steps, seed, validate, budget_s)
        leftovers = [Path(argv[argv.index(flag) + 1]) / argv[argv.index("--run_name") + 1]
                     for flag in ("--checkpoint_dir", "--log_dir", "--results_dir")]
    else:
        leftovers = [out / "open_clip_train"]
        argv = theirs_argv(data, recipe, epochs, seed, validate, leftovers[0])
    params = {"trainer": recipe.trainer, "argv": argv, "every": every, "out": str(out / "snapshots")}
    result = {**common.run_job("snapshots", params, log_name=f"quality-{label}"), "label": label, "seed": seed,
              "budget_s": budget_s}
    if recipe.trainer == "train.py":
        result.update(keep_checkpoints(leftovers[0], leftovers[2], out / "snapshots"))
    for folder in leftovers:
        shutil.rmtree(folder, ignore_errors=True)
    if result["steps"] != steps and not budget_s:
        sys.exit(f"{label}: {result['steps']} optimiser steps, expected {steps}; see bench/out/logs/")
    return result


def keep_checkpoints(checkpoints: Path, results: Path, out: Path) -> dict:
    """train.py's best.pt and last.pt moved to `out`, with their steps, and its validations
    (step, rsum) and time budget from training_results.json."""
    summary = json.loads((results / "training_results.json").read_text())
    kept = {}
    for name, step in (("best", summary["best"]["step"]), ("final", summary["history"]["val"][-1]["step"])):
        path = out / f"{name}.pt"
        shutil.move(checkpoints / ("best.pt" if name == "best" else "last.pt"), path)
        kept[name] = {"path": str(path), "step": step}
    return {"checkpoints": kept, "time_budget": summary.get("time_budget"),
            "validations": [{"step": v["step"], "rsum": v["retrieval"]["rsum"]} for v in summary["history"]["val"]]}


_evaluating = threading.Lock()   # ablation runs finish in parallel threads; evaluate one at a time


def evaluate_snapshots(result: dict, test: Path, recipe: Recipe = OURS) -> dict:
    """Every snapshot of a run on the test split with our evaluation code (its retrieval metrics
    are added to the snapshot); the weight files are deleted afterwards. The recipe's --loss
    builds the model (the sigmoid loss adds a learned bias)."""
    sys.path.insert(0, str(common.REPO))
    import clip_model
    import data_loader
    import evaluation
    flags = list(map(str, recipe.flags))
    loss = flags[flags.index("--loss") + 1] if "--loss" in flags else "clip"
    with _evaluating:
        index = data_loader.load_caption_index(test)
        for snapshot in result["snapshots"] + list(result.get("checkpoints", {}).values()):
            setup = clip_model.build_model(SHARED["model"], pretrained=snapshot["path"], loss=loss)
            snapshot["retrieval"] = evaluation.evaluate_model(setup, index, batch_size=SHARED["batch"])["retrieval"]
            os.remove(snapshot["path"])
    return result


def recall(snapshot: dict, metric=("text_to_image", "R@1")) -> float:
    if metric == "mean_recall":
        return snapshot["retrieval"]["mean_recall"]
    return snapshot["retrieval"][metric[0]][metric[1]]


# ----------------------------------------------------------------------------------------------
# Side by side: recall against wall time

def compare(args, data: Data, raw: Path, earlier: dict) -> dict:
    """Per seed: open_clip_train with its recipe, then each chosen train.py recipe with
    --time_budget set to open_clip_train's wall time; every run's copies and checkpoints evaluated.
    The copies fall every quarter of an epoch of caption rows, so on every validation train.py
    makes at an epoch's end (its default). `earlier` (merge_runs of --from_json files): runs kept,
    and an open_clip_train run of a seed there is not repeated (its wall time is the budget)."""
    every = max(1, data.rows // SHARED["batch"] // 4)
    names = [name for k, name in enumerate(BUDGET_RECIPES) if not args.recipes or k in args.recipes]
    runs = {"open_clip_train": [], **{name: [] for name in names}}
    for name, results in earlier.items():
        runs.setdefault(name, []).extend(r for r in results if name == "open_clip_train" or name not in names)

    def report(name, result):
        runs[name].append(result)
        runs[name].sort(key=lambda r: r["seed"])
        raw.write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))   # kept if interrupted
        print(f"seed {result['seed']} {name}: {result['steps']} steps in {result['total_s']:.0f} s, test mean "
              f"recall {recall(final_weights(result), 'mean_recall'):.1f} (load {common.load_average():.1f})",
              flush=True)
    for seed in args.seeds:
        theirs = next((r for r in runs["open_clip_train"] if r["seed"] == seed), None)
        if theirs is None:
            theirs = train(THEIRS, data, f"open_clip_train-seed{seed}", args.epochs, every, seed)
            report("open_clip_train", evaluate_snapshots(theirs, data.test, THEIRS))
        for name in names:
            recipe = BUDGET_RECIPES[name]
            result = train(recipe, data, f"budget{list(BUDGET_RECIPES).index(name)}-seed{seed}", args.epochs,
                           every, seed, budget_s=theirs["total_s"])
            report(name, evaluate_snapshots(result, data.test, recipe))
    return {name: runs[name] for name in ["open_clip_train", *BUDGET_RECIPES] if runs.get(name)}


def final_weights(result: dict) -> dict:
    """The evaluated final weights of a run: train.py's last.pt, open_clip_train's last copy."""
    return result["checkpoints"]["final"] if "checkpoints" in result else result["snapshots"][-1]


def budget_table(runs: dict) -> str:
    """Per train.py recipe and seed: steps, wall time against the budget, test recall of the
    final weights and its ratio to open_clip_train's of the same seed."""
    theirs = {r["seed"]: r for r in runs["open_clip_train"]}
    rows = []
    for name, results in runs.items():
        for result in results:
            final, base = final_weights(result), final_weights(theirs[result["seed"]])
            budget_s = result["budget_s"] or result["total_s"]
            rows.append([name, result["seed"], result["steps"], f"{result['total_s']:.0f}",
                         f"{result['total_s'] / budget_s:.3f}",
                         *[f"{recall(final, metric):.1f}" for metric in
                           (("text_to_image", "R@1"), ("image_to_text", "R@1"), "mean_recall")],
                         f"{recall(final, 'mean_recall') / recall(base, 'mean_recall'):.2f}"])
    return common.table(["trainer, recipe", "seed", "steps", "wall time (s)", "of the budget", "t->i R@1",
                         "i->t R@1", "mean recall", "x open_clip_train"], rows)


def old_rule_pick(result: dict) -> dict:
    """The weights today's rule would have kept before the noise margin (the highest validation
    rsum, the first of equals): their evaluated copy."""
    best = max(result["validations"], key=lambda v: v["rsum"])
    if best["step"] == result["checkpoints"]["final"]["step"]:
        return result["checkpoints"]["final"]
    return next(s for s in result["snapshots"] if s["step"] == best["step"])


def rising(results: list) -> int:
    """How many runs' validation scores rose at every validation."""
    return sum(all(a["rsum"] < b["rsum"] for a, b in zip(r["validations"], r["validations"][1:])) for r in results)


def best_table(runs: dict) -> str:
    """How the checkpoint a rule keeps compares with the final weights on the test split, over
    every train.py run: the highest validation score, and best.pt's rule (evaluation.standard_error).
    Returns the table and, per rule, how often its pick beat and lost to the final weights."""
    rows, counts = [], {"highest": [0, 0], "best.pt": [0, 0]}
    for name, results in runs.items():
        for result in results:
            if "checkpoints" not in result:
                continue
            final = recall(result["checkpoints"]["final"], "mean_recall")
            picks = {"highest": old_rule_pick(result), "best.pt": result["checkpoints"]["best"]}
            for rule, pick in picks.items():
                counts[rule][0] += recall(pick, "mean_recall") > final
                counts[rule][1] += recall(pick, "mean_recall") < final
            rows.append([name, result["seed"], f"{final:.2f}",
                         *[f"{picks[rule]['step']}: {recall(picks[rule], 'mean_recall'):.2f}" for rule in picks]])
    table = common.table(["recipe", "seed", "final weights", "highest validation rsum (step: test)",
                          "best.pt (step: test)"], rows)
    return table, counts


def plot(runs: dict, path: Path):
    """Test mean recall against elapsed minutes, one line per run (seed 0 solid)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(9, 5))
    for k, (name, results) in enumerate(runs.items()):
        for r, result in enumerate(results):
            axis.plot([0] + [s["elapsed_s"] / 60 for s in result["snapshots"]],
                      [0] + [recall(s, "mean_recall") for s in result["snapshots"]], marker="o",
                      markersize=3, color=f"C{k}", alpha=1 if r == 0 else 0.4, label=name if r == 0 else None)
    axis.set(title="mean of R@1/5/10 both ways (test)", xlabel="wall time since start (min)", ylabel="%")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def comparison_section(args, data: Data, runs: dict, loads) -> str:
    info = json.loads((data.train.parent / "info.json").read_text())
    best, counts = best_table(runs)
    ours = [r for name, results in runs.items() if name != "open_clip_train" for r in results]
    return f"""{HEADING}

Held-out recall at equal wall time, train.py against open_clip's trainer (`open_clip_train.main`,
run unchanged) on real data: Debian's clip art (bench/clipart.py; {data.rows:,} caption rows of
{info['train']['images'] if not args.train_images else args.train_images:,} training images,
validation on {info['val']['images']} images, test on {info['test']['images']} images
({info['test']['captions']:,} captions) of the same category folders). For each seed,
open_clip_train runs first with its recipe: {SHARED['model']}, batch {SHARED['batch']},
{SHARED['precision']}, {SHARED['workers']} workers, learning rate {SHARED['lr']}, warmup
{SHARED['warmup']}, {args.epochs} epochs of caption rows, its defaults otherwise (validation after
each epoch included). Its wall time, from the process start to the end of its last epoch's
validation and checkpoint, is then the `--time_budget` of each train.py recipe, with the same
shared settings and train.py's defaults otherwise. Test recall of the final weights (train.py's
last.pt; open_clip_train's weights after its last step), evaluated by our evaluation.py.
Machine: {common.machine()}; load average {loads[0]:.1f} before, {loads[1]:.1f} after. Rerun:
{common.rerun()} (open_clip_train needs `pip install pandas braceexpand`).

{budget_table(runs)}

"of the budget": train.py's wall time over open_clip_train's (measured the same way, from the
job's start to the trainer's return).

Which checkpoint to keep (issue 32, item 3): at each validation train.py saw, the weights were
also copied and evaluated on the test split, so each rule's pick can be scored on held-out data.
"Highest validation rsum" is the rule best.pt followed before; best.pt now keeps a new best only
when it beats the old by more than one standard error of the validation metric, and keeps the
final weights of a finished run unless an earlier best beats them by more than that. Over the
{len(ours)} train.py runs, the pick of the highest validation score scored above the final weights
on the test split in {counts['highest'][0]} and below them in {counts['highest'][1]}; best.pt's pick in
{counts['best.pt'][0]} and {counts['best.pt'][1]}. In {rising(ours)} of the {len(ours)} runs the validation score
rose at every validation, so there the rules could only keep the final weights: a run cut off by
a budget with its rate decaying to the end is still improving when it ends, unlike a long run
that plateaus, where the rule matters (tests/test_train.py checks it on such a history).

{best}

![test recall against wall time]({PLOT.name})
"""


# ----------------------------------------------------------------------------------------------
# Ablations: recall at equal steps

def ablations(args, data: Data, raw: Path) -> dict:
    """Every recipe of ABLATIONS for every seed (args.parallel runs at a time), evaluated at its
    last step: name -> list of results, in seed order."""
    every = data.rows // SHARED["batch"]     # after each of open_clip_train's epochs
    names = [name for k, name in enumerate(ABLATIONS) if not args.only or k in args.only]
    slug = {name: f"ablation{list(ABLATIONS).index(name)}" for name in names}

    finished, saving = {}, threading.Lock()   # saved to `raw` after every run: an interrupted invocation keeps them

    def run(job):
        name, seed = job
        result = train(ABLATIONS[name], data, f"{slug[name]}-seed{seed}", args.epochs, every, seed=seed,
                       validate=False)
        result = evaluate_snapshots(result, data.test, ABLATIONS[name])
        print(f"{name}, seed {seed}: test R@1 t->i {recall(result['snapshots'][-1]):.1f}, i->t "
              f"{recall(result['snapshots'][-1], ('image_to_text', 'R@1')):.1f}", flush=True)
        with saving:
            finished.setdefault(name, []).append(result)
            raw.write_text(json.dumps({"args": vars(args), "runs": finished}, indent=1))
        return result
    jobs = [(name, seed) for seed in args.seeds for name in names]
    with ThreadPoolExecutor(args.parallel) as pool:
        results = dict(zip(jobs, pool.map(run, jobs)))
    return {name: [results[name, seed] for seed in args.seeds] for name in names}


def merge_runs(files) -> dict:
    """The ablation runs saved by several invocations (their raw JSON files), name -> results in
    seed order; a later file's run of the same recipe and seed replaces an earlier one."""
    merged = {}
    for file in files:
        for name, results in json.loads(Path(file).read_text())["runs"].items():
            merged.setdefault(name, {}).update({r["seed"]: r for r in results})
    order = [name for name in ABLATIONS if name in merged] + [name for name in merged if name not in ABLATIONS]
    return {name: [merged[name][seed] for seed in sorted(merged[name])] for name in order}


def ablation_table(runs: dict) -> str:
    """Per recipe: test recalls at the last step, median (range) over seeds, and the change of
    mean recall against train.py's defaults of the same seed."""
    def spread(values):
        return (f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"
                if len(values) > 1 else f"{values[0]:.1f}")
    base = {r["seed"]: r["snapshots"][-1] for r in runs["train.py defaults"]}
    rows = []
    for name, results in runs.items():
        finals = {r["seed"]: r["snapshots"][-1] for r in results}
        delta = [recall(f, "mean_recall") - recall(base[seed], "mean_recall")
                 for seed, f in finals.items() if seed in base]
        rows.append([name, len(finals), *[spread([recall(f, metric) for f in finals.values()]) for metric in
                                          (("text_to_image", "R@1"), ("text_to_image", "R@5"),
                                           ("image_to_text", "R@1"), ("image_to_text", "R@5"), "mean_recall")],
                     "" if name == "train.py defaults" else spread(delta)])
    return common.table(["setting (what differs from train.py's defaults)", "seeds", "t->i R@1", "t->i R@5",
                         "i->t R@1", "i->t R@5", "mean recall", "change of mean recall"], rows)


def ablation_heading(args) -> str:
    """One section per data regime: the whole training set, or --train_images N --epochs E."""
    regime = f" --train_images {args.train_images} --epochs {args.epochs}" if args.train_images else ""
    return f"{HEADING} --ablations{regime}"


def ablation_section(args, data: Data, runs: dict) -> str:
    steps = runs["train.py defaults"][0]["steps"]
    return f"""{ablation_heading(args)}

Which of train.py's defaults cost held-out recall, at equal steps: the clip-art data
({data.images:,} training images, {data.rows:,} caption rows) and the shared settings of the
section above, {steps} steps of batch {SHARED['batch']} ({steps * SHARED['batch'] / data.images:.1f}
epochs of images, {args.epochs} of caption rows). Each row changes train.py's defaults (the
augmentation's strength, or one choice of open_clip_train's); the last is open_clip_train
itself. Test
recall at the last step, in percent: median (range) over seeds {', '.join(map(str, args.seeds))};
the change of mean recall (mean of the six R@K) is paired by seed against train.py's defaults.
Timing plays no part (the runs had {'/'.join(map(str, sorted({r['threads'] for rs in runs.values() for r in rs})))}
torch thread(s)). Rerun: `.venv/bin/python bench/bench_quality.py --ablations --seeds
{' '.join(map(str, args.seeds))}{ablation_heading(args)[len(HEADING) + len(' --ablations'):]} --threads 1`.

{ablation_table(runs)}
"""


# ----------------------------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", type=int, nargs="+", help="train.py's recipes at the budget (numbers: "
                        + ", ".join(f"{k} {name}" for k, name in enumerate(BUDGET_RECIPES)) + "; default: all)")
    parser.add_argument("--epochs", type=int, default=EPOCHS,
                        help="open_clip_train's epochs of caption rows; train.py gets the same steps")
    parser.add_argument("--train_images", type=int, default=0, help="train on the first N images only (0: all)")
    parser.add_argument("--image_size", type=int, default=128, help="clipart.py --size")
    parser.add_argument("--data_seed", type=int, default=0, help="clipart.py --seed")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 384 training images, 2 epochs, 1 seed")
    parser.add_argument("--ablations", action="store_true", help="recall at equal steps of one-change recipes")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of the runs")
    parser.add_argument("--only", type=int, nargs="+", help="run these ablations only (numbers: "
                        + ", ".join(f"{k} {name}" for k, name in enumerate(ABLATIONS)).replace("%", "%%") + "); 0 always runs")
    parser.add_argument("--from_json", nargs="+", metavar="FILE", help="runs saved in these raw files "
                        "(bench/out/quality/*.json) are kept: with --ablations, no training, their table; "
                        "otherwise the chosen --recipes run beside them, budgeted by their open_clip_train runs")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default); "
                        "for --ablations on a busy machine")
    parser.add_argument("--parallel", type=int, default=1, help="ablation runs at a time")
    parser.add_argument("--no_readme", action="store_true", help="print the tables only")
    args = parser.parse_args()
    if args.threads:   # torch reads it at import: in the runs' processes and in this one (evaluation)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if args.only and 0 not in args.only:   # the other rows are compared with it
        args.only.insert(0, 0)
    if args.quick:
        args.train_images, args.epochs, args.seeds = args.train_images or 384, 2, args.seeds[:1]
    data = prepare_data(args)
    raw = common.OUT / "quality" / f"{'ablations' if args.ablations else 'comparison'}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    if args.ablations:
        runs = merge_runs(args.from_json) if args.from_json else ablations(args, data, raw)
        args.seeds = sorted({r["seed"] for results in runs.values() for r in results})
        section = ablation_section(args, data, runs)
    else:
        loads = [common.load_average()]
        runs = compare(args, data, raw, merge_runs(args.from_json) if args.from_json else {})
        loads.append(common.load_average())
        plot(runs, PLOT if not args.no_readme else common.OUT / PLOT.name)
        section = comparison_section(args, data, runs, loads)
    print(section)
    if not (args.ablations and args.from_json):
        raw.write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))
        print(f"every run's snapshots and metrics: {raw}")
    if not args.no_readme:
        common.write_readme(ablation_heading(args) if args.ablations else HEADING, section)


if __name__ == "__main__":
    main()
