"""Start-up: time from `python train.py ...` to the first training step, and of
`python train.py --help`, each against the floor it cannot beat.

    .venv/bin/python bench/bench_startup.py                  # 3 rounds; updates bench/README.md
    .venv/bin/python bench/bench_startup.py --rounds 1 --no_readme

`train.py --max_steps 1` in its default configuration on a generated set of 2000 images, as a
user starts it (a fresh `python train.py` process in the repository). Times are taken from
outside, as its output arrives: the log line `training N steps` (the loop is about to start),
then tqdm's `1/N` on stderr (the first step is done: workers started, first batch loaded,
forward, backward, optimiser step). The floor of the first is the moment `python -c "import
torch, open_clip"` has imported both (train.py needs them before it can build a model; their
exit takes another fraction of a second); the floor of `--help` is `python -c pass`. Finally `python -X importtime` lists the slowest imports on the way to the first
step (each with everything it imports in turn).
"""
import argparse
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time

import common

HEADING = "## bench_startup.py"


def timed(argv, cwd, marks=()) -> dict:
    """Run argv; seconds to exit and to the first output matching each (name, regex) of marks."""
    started = time.perf_counter()
    process = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen, text = {}, {"out": "", "err": ""}

    def watch(stream, key):
        while chunk := stream.read1(4096):
            text[key] += chunk.decode(errors="replace")
            for name, pattern in marks:
                if name not in seen and re.search(pattern, text[key]):
                    seen[name] = time.perf_counter() - started
    threads = [threading.Thread(target=watch, args=(process.stdout, "out")),
               threading.Thread(target=watch, args=(process.stderr, "err"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if process.wait():
        sys.exit(f"{' '.join(map(str, argv))} failed:\n{text['err'][-3000:]}")
    return {"exit_s": time.perf_counter() - started, **seen, "stderr": text["err"]}


def import_times(stderr: str, top: int = 8) -> list:
    """(module, seconds) of the slowest imports made at the top level (not from inside another
    import) in `python -X importtime` output, up to tqdm's `1/N`: the end of the first step."""
    end = re.search(r"\b1/\d+", stderr)
    totals = []
    for line in stderr[:end.start() if end else len(stderr)].splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\s*)(\S+)", line)
        if match and not match.group(2):      # no indent: imported at the top level
            totals.append((match.group(3), int(match.group(1)) / 1e6))
    return sorted(totals, key=lambda item: -item[1])[:top]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of all runs, alternating")
    parser.add_argument("--repo", default=str(common.REPO), help="repository whose train.py is measured")
    parser.add_argument("--no_readme", action="store_true", help="print the tables only")
    args = parser.parse_args()
    repo = common.Path(args.repo)
    data = common.sample_data(2000) / "data.json"
    python, train_py = sys.executable, str(repo / "train.py")

    def first_step():
        argv = common.train_argv(data, "--max_steps", 1, repo=repo)
        result = timed([python, train_py, *argv], repo,
                       marks=[("loop_s", r"training \d+ steps"), ("first_step_s", r"\b1/\d+")])
        run = argv[argv.index("--run_name") + 1]
        shutil.rmtree(common.OUT / "runs" / "checkpoints" / run, ignore_errors=True)
        return result

    sides = {"train.py --max_steps 1": first_step,
             "import torch, open_clip": lambda: timed(
                 [python, "-c", "import torch, open_clip; print('imported', flush=True)"], repo,
                 marks=[("imported_s", "imported")]),
             "train.py --help": lambda: timed([python, train_py, "--help"], repo),
             "python -c pass": lambda: timed([python, "-c", "pass"], repo)}

    def report(name, r, result):
        figures = ", ".join(f"{k} {v:.2f}" for k, v in result.items() if k.endswith("_s"))
        print(f"round {r + 1} {name:24}: {figures} (load {common.load_average():.1f})", flush=True)

    load_before = common.load_average()
    runs = common.alternate(sides, args.rounds, report)
    load_after = common.load_average()

    def median(name, key="exit_s"):
        return statistics.median(r[key] for r in runs[name])

    def ratios(name, key, floor, floor_key="exit_s"):
        return common.median_spread([a[key] / b[floor_key] for a, b in zip(runs[name], runs[floor])])
    rows = [["`python train.py --max_steps 1`: to the loop", f"{median('train.py --max_steps 1', 'loop_s'):.2f}",
             "`import torch, open_clip`", f"{median('import torch, open_clip', 'imported_s'):.2f}",
             ratios("train.py --max_steps 1", "loop_s", "import torch, open_clip", "imported_s")],
            ["... to the end of the first step", f"{median('train.py --max_steps 1', 'first_step_s'):.2f}",
             "`import torch, open_clip`", f"{median('import torch, open_clip', 'imported_s'):.2f}",
             ratios("train.py --max_steps 1", "first_step_s", "import torch, open_clip", "imported_s")],
            ["`python train.py --help`", f"{median('train.py --help'):.2f}", "`python -c pass`",
             f"{median('python -c pass'):.2f}", ratios("train.py --help", "exit_s", "python -c pass")]]
    result = common.table(["what", "seconds", "floor", "floor (s)", "ratio to floor"], rows)

    argv = common.train_argv(data, "--max_steps", 1, repo=repo)
    profile = timed([python, "-X", "importtime", train_py, *argv], repo)
    shutil.rmtree(common.OUT / "runs" / "checkpoints" / argv[argv.index("--run_name") + 1],
                  ignore_errors=True)
    imports = common.table(["imported on the way to the first step", "import time (s)"],
                           [[module, f"{seconds:.2f}"] for module, seconds in import_times(profile["stderr"])])
    print(f"\n{result}\n\n{imports}")
    if args.no_readme:
        return
    common.write_readme(HEADING, f"""{HEADING}

Start-up of `python train.py` (default configuration, `--max_steps 1`, a generated set of 2000
images) timed from outside as its output arrives: to the log line `training N steps` (the loop
starts) and to tqdm's `1/N` (the first step is done), against the floor: the moment `python -c "import
torch, open_clip"` has imported both; and `python train.py --help` against `python -c pass`. {args.rounds} rounds, alternating;
medians, and the ratio's median (range). The second table: the slowest imports on the way to the
first step, each with what it imports in turn (`python -X importtime`, one run; it adds its own
overhead).
Machine: {common.machine()}; load average {load_before:.1f} before, {load_after:.1f} after.
Rerun: {common.rerun()}.

{result}

{imports}
""")


if __name__ == "__main__":
    main()
