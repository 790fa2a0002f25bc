"""Distillation: does tiny-vit-64 taught by a larger CLIP beat tiny-vit-64 trained alone, at the
same steps, by more than the seed-to-seed spread? And what does the teacher cost in samples/s?

    .venv/bin/python bench/bench_distill.py                  # all of it; updates bench/README.md
    .venv/bin/python bench/bench_distill.py --only recall    # recall only (no timings)
    .venv/bin/python bench/bench_distill.py --quick          # a small version, to check the script

The teacher: by default tiny-vit-64 itself trained from scratch on the generated training set for
--teacher_epochs (5x the students' steps), its learning rate decayed to 0 by the end: the student's
architecture, made a better model by a longer run. A larger preset (--teacher small-vit-128)
trains at about 4.6 s a step on a 2-core CPU, too slow to reach convergence here; in 15 epochs it
scored no better than the student. It is validated every epoch on a validation
set (500 images of another seed of the generator); its best.pt is kept under bench/out/distill/
and reused by every later run with the same settings. The table says at which step it was best
and how far recall moved over its last epochs: a converged teacher has stopped gaining. The students: tiny-vit-64 on the same training set, with the same
steps, schedule and seeds, trained alone and with the teacher (--distill_from, the distillation
settings at their defaults unless given after --distill_args); each scored by the mean recall of
its final weights on a held-out set (500 images of a third seed), which does not depend on the
machine's load. Seeds change the student's initialisation, data order, captions and
augmentation; the same seed gives both students the same start, so their gain is also shown
seed by seed. The cost: training samples/s of the student alone, with the teacher and with
--distill_cache, all three without augmentation (which the cache needs), each in a fresh process,
side by side in alternating order (common.alternate), as ratios to training alone.
"""
import argparse
import json
import shutil
import statistics

import common

HEADING = "## bench_distill.py"
SPEED_HEADING = "## bench_distill.py --only speed"
FULL = {"num_images": 1000, "teacher_epochs": 40, "student_steps": 240, "seeds": 3, "speed_steps": 30,
        "rounds": 2}
QUICK = {"num_images": 400, "teacher_epochs": 6, "student_steps": 24, "seeds": 2, "speed_steps": 8, "rounds": 1}
TEACHER = "tiny-vit-64"
BATCH = 64
ENV = {}                         # for the jobs: OMP_NUM_THREADS with --threads


def teacher_checkpoint(args, train_set, validation_set, heldout) -> dict:
    """The teacher's best.pt, trained once per setting and cached, with what it scored."""
    name = f"teacher-{args.teacher}-{args.num_images}img-{args.teacher_epochs}ep-lr{args.teacher_lr}"
    folder = common.OUT / "distill" / name
    if not (folder / "teacher.json").is_file():
        print(f"training the teacher {args.teacher} (cached in {folder})", flush=True)
        argv = common.train_argv(train_set, "--val_data", validation_set, "--model_name", args.teacher,
                                 "--batch_size", BATCH, "--learning_rate", args.teacher_lr,
                                 "--num_epochs", args.teacher_epochs)
        result = common.run_job("train", {"argv": argv}, env=ENV, log_name="distill-teacher")
        folder.mkdir(parents=True, exist_ok=True)
        run = common.Path(result["checkpoint_dir"])
        shutil.move(run / "best.pt", folder / "best.pt")
        history = json.loads((run.parent.parent / "results" / run.name / "training_results.json").read_text())
        shutil.rmtree(run, ignore_errors=True)
        retrieval = common.evaluate(common.REPO, heldout, "distill-teacher", ["--checkpoint", str(folder / "best.pt")])
        curve = [(e["step"], e["retrieval"]["mean_recall"]) for e in history["history"]["val"]]
        (folder / "teacher.json").write_text(json.dumps({"steps": result["steps"], "retrieval": retrieval,
                                                         "validation": curve}))
    return {"checkpoint": folder / "best.pt", **json.loads((folder / "teacher.json").read_text())}


def teacher_summary(args, teacher) -> str:
    """The teacher in a sentence: its steps, its best validation and how recall moved at the end."""
    curve = teacher["validation"]
    best_step, best = max(curve, key=lambda point: point[1])
    last = curve[-max(1, len(curve) // 5):]
    return (f"{args.teacher}, {teacher['steps']} steps ({args.teacher_epochs} epochs of {args.num_images} images); "
            f"validation mean recall best {best:.1f} at step {best_step}, {last[0][1]:.1f} -> {last[-1][1]:.1f} over "
            f"its last {len(last)} epochs; held-out mean recall of best.pt {teacher['retrieval']['mean_recall']:.1f}")


def student(train_set, heldout, steps, seed, *flags):
    """A tiny-vit-64 run of `steps` steps, validated once, at the end, on the held-out set."""
    def run():
        argv = common.train_argv(train_set, "--val_data", heldout, "--model_name", "tiny-vit-64",
                                 "--batch_size", BATCH, "--max_steps", steps, "--eval_every", steps,
                                 "--warmup_steps", max(1, steps // 10), "--seed", seed, *flags)
        result = common.run_job("train", {"argv": argv}, env=ENV, log_name="distill-student")
        shutil.rmtree(result["checkpoint_dir"], ignore_errors=True)
        return result
    return run


def recall_table(args, train_set, heldout, teacher):
    """Mean recall of the students alone and distilled, seed by seed; the table and the verdict."""
    recalls = {"alone": [], "distilled": []}
    for seed in range(args.seeds):
        for arm, flags in (("alone", ()), ("distilled", ("--distill_from", teacher["checkpoint"], *args.distill_args))):
            result = student(train_set, heldout, args.student_steps, seed, *flags)()
            recalls[arm].append(result["retrieval"]["mean_recall"])
            print(f"  seed {seed} {arm:9}: mean recall {recalls[arm][-1]:5.1f} "
                  f"(load {common.load_average():.1f})", flush=True)
    gains = [d - a for a, d in zip(recalls["alone"], recalls["distilled"])]

    def spread(values):
        return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else \
            f"{values[0]:.1f}"
    rows = [[arm, spread(values), f"{min(values):.1f} - {max(values):.1f}", " / ".join(f"{v:.1f}" for v in values)]
            for arm, values in recalls.items()]
    rows.append(["gain (distilled - alone, same seed)", spread(gains), f"{min(gains):.1f} - {max(gains):.1f}",
                 " / ".join(f"{g:+.1f}" for g in gains)])
    table = common.table(["tiny-vit-64 student", "mean recall, mean ± sd", "range", "per seed"], rows)
    sd = max(statistics.stdev(v) for v in recalls.values()) if args.seeds > 1 else float("nan")
    gain = statistics.mean(gains)
    verdict = (f"The distilled students' mean recall is {gain:+.1f} points from the students trained alone; "
               f"the larger seed-to-seed standard deviation of the two is {sd:.1f} points: "
               f"{'a gain beyond the spread' if gain > sd else 'NOT a gain beyond the spread'}. Seed by seed "
               f"(the same start and data order) the gain is {spread(gains)} points"
               f"{', positive for every seed' if min(gains) > 0 else ''}.")
    return table, verdict


def speed_table(args, train_set, heldout, teacher):
    """Samples/s of training alone, with the teacher and with the cached teacher, side by side."""
    plain = ("--no-augment",)
    with_teacher = (*plain, "--distill_from", teacher["checkpoint"], *args.distill_args)
    sides = {"alone": student(train_set, heldout, args.speed_steps, 0, *plain),
             "with the teacher": student(train_set, heldout, args.speed_steps, 0, *with_teacher),
             "with the teacher, --distill_cache": student(train_set, heldout, args.speed_steps, 0, *with_teacher,
                                                          "--distill_cache")}

    def report(name, r, result):
        print(f"  round {r + 1} {name:34}: {result['samples_per_s']:6.1f} samples/s, start-up "
              f"{result['startup_s']:.1f} s (load {common.load_average():.1f})", flush=True)
    runs = common.alternate(sides, args.rounds, report)
    rows = []
    for name, results in runs.items():
        ratios = [r["samples_per_s"] / a["samples_per_s"] for r, a in zip(results, runs["alone"])]
        rows.append([name, f"{statistics.median(r['samples_per_s'] for r in results):.1f}",
                     common.median_spread(ratios), f"{statistics.median(r['startup_s'] for r in results):.1f}"])
    return common.table(["tiny-vit-64, no augmentation", "samples/s (median)", "vs alone, median (range)",
                         "start-up (s)"], rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small version in minutes; prints, no README")
    parser.add_argument("--only", choices=("recall", "speed"), help="one table and its README section only "
                        "(recall: no timings, so it may run beside other work)")
    parser.add_argument("--teacher", default=TEACHER, help="the teacher's model, a preset or open_clip name")
    parser.add_argument("--teacher_lr", type=float, default=1e-3, help="the teacher's learning rate")
    common.add_size_arguments(parser, FULL, QUICK)
    parser.add_argument("--threads", type=int, default=0, help="torch threads of each run (OMP_NUM_THREADS); 0 = "
                        "torch's default. One thread runs far faster on a busy machine; recall does not change")
    parser.add_argument("--no_readme", action="store_true", help="print the tables only")
    parser.add_argument("--distill_args", nargs=argparse.REMAINDER, default=[],
                        help="train.py flags for the distilled student, e.g. --distill_weight 0.7 (must come last)")
    args = parser.parse_args()
    common.sizes_of(args, FULL, QUICK)
    if args.threads:
        ENV["OMP_NUM_THREADS"] = str(args.threads)
    train_set = common.sample_data(args.num_images) / "data.json"
    heldout = common.sample_data(500, seed=1) / "data.json"
    validation_set = common.sample_data(500, seed=2) / "data.json"
    load_before = common.load_average()
    teacher = teacher_checkpoint(args, train_set, validation_set, heldout)
    print(f"teacher: {teacher_summary(args, teacher)}", flush=True)
    tables = {}
    if args.only in (None, "recall"):
        print(f"students: {args.seeds} seeds x (alone, distilled), {args.student_steps} steps each", flush=True)
        tables["recall"], verdict = recall_table(args, train_set, heldout, teacher)
        print(f"\n{tables['recall']}\n\n{verdict}\n")
    if args.only in (None, "speed"):
        print(f"cost: {args.rounds} rounds of 3 runs of {args.speed_steps} steps", flush=True)
        tables["speed"] = speed_table(args, train_set, heldout, teacher)
        print(f"\n{tables['speed']}\n")
    if args.quick or args.no_readme:
        return
    loads = (load_before, common.load_average())
    if "recall" in tables:
        common.write_readme(HEADING, recall_section(args, teacher, tables["recall"], verdict, loads))
    if "speed" in tables:
        common.write_readme(SPEED_HEADING, speed_section(args, tables["speed"], loads))


def recall_section(args, teacher, table, verdict, loads) -> str:
    return f"""{HEADING}

Distillation (`--distill_from`, clip_model.DistillationLoss). Teacher, trained from scratch on the
generated training set, validated every epoch on 500 images of another seed, best.pt kept:
{teacher_summary(args, teacher)}. Students: tiny-vit-64, batch {BATCH},
{args.student_steps} steps, the same data, schedule and seeds, alone and distilled (distillation settings
{' '.join(map(str, args.distill_args)) or 'at their defaults'}); mean recall (the mean of R@1/5/10 in both
directions, %) of the final weights on a held-out set of 500 images (a third seed). Recall does not
depend on the machine's load (the runs may share the cores with other work).
Machine: {common.machine()}; load average {loads[0]:.1f} before, {loads[1]:.1f} after.
Rerun: {common.rerun()} (the teacher is trained once and kept in bench/out/distill/).

{table}

{verdict}
"""


def speed_section(args, table, loads) -> str:
    return f"""{SPEED_HEADING}

What the teacher costs: samples/s of the tiny-vit-64 student's whole training loop (validation left
out) without augmentation, batch {BATCH}, {args.speed_steps} steps, alone, with the {args.teacher} teacher
(distillation settings {' '.join(map(str, args.distill_args)) or 'at their defaults'}) and with
`--distill_cache`; {args.rounds} rounds in alternating order, each run in a fresh process, on a quiet
machine; start-up includes the cache's one pass.
Machine: {common.machine()}; load average {loads[0]:.1f} before, {loads[1]:.1f} after.
Rerun: {common.rerun()}.

{table}
"""


if __name__ == "__main__":
    main()
