"""What the training benchmarks (bench_peer, bench_data, bench_scaling,
bench_startup, bench_distill) share: generated data sets, the bare loop they compare against,
measured runs in fresh processes, held-out evaluation, medians of side-by-side ratios, tables and
bench/README.md sections.

Why ratios, side by side. This machine is shared: other jobs come and go, and a speed measured at
one moment says little about the next. So every figure is a ratio of two things measured in the
same run, in alternating order (A B B A A B ...), and the tables show the median of the ratios of
neighbouring pairs together with the spread.

Why fresh processes. A measured run happens in its own process (`python bench/common.py JOB
'{json}'`, see `run_job`): its peak resident memory (ru_maxrss from os.wait4) is its own, torch
starts with its default threads, and nothing one run imported or cached helps the next.

The bare loop (`bare_loop`) is the model's own speed: forward, loss, backward and an AdamW step
on one batch of tensors already in memory, the same model, batch and precision as train.py, and
nothing else: no data loading, clipping, schedule, logging or checkpoints.
"""
import itertools
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
OUT = BENCH / "out"
RESULT_MARK = "BENCH_RESULT "   # a job's last stdout line: this mark and its result as JSON


# ----------------------------------------------------------------------------------------------
# Data, machine, tables

def sample_data(num_images: int = 2000, seed: int = 0) -> Path:
    """A generated data set (sample_data.create_sample_dataset), written once under bench/out/data/
    and reused: its data.json holds num_images 64 px PNGs with 2 or 3 captions each."""
    folder = OUT / "data" / f"shapes-{num_images}-seed{seed}"
    if not (folder / "data.json").is_file():
        sys.path.insert(0, str(REPO))
        import sample_data
        tmp = folder.with_name(folder.name + ".tmp")
        if tmp.exists():
            import shutil
            shutil.rmtree(tmp)
        sample_data.create_sample_dataset(tmp, num_samples=num_images, seed=seed)
        os.replace(tmp, folder)
    return folder


def add_size_arguments(parser, full: dict, quick: dict):
    """A flag for each size of a benchmark (--num_images, --seeds, ...): the full run's by default,
    the quick one's with --quick (sizes_of fills them in)."""
    for name, value in full.items():
        parser.add_argument(f"--{name}", type=int, help=f"default {value} ({quick[name]} with --quick)")


def sizes_of(args, full: dict, quick: dict):
    """Fill in the sizes the command line left out, from the full or the quick run."""
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    torch_version = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"],
                                   capture_output=True, text=True).stdout.strip()
    return (f"{os.cpu_count()} cores ({cpu}), torch {torch_version}, "
            f"Python {platform.python_version()}")


def load_average() -> float:
    return os.getloadavg()[0]


def median_spread(values) -> str:
    """'0.93 (0.90-0.95)': the median and the range of a list of ratios."""
    values = sorted(values)
    return f"{statistics.median(values):.2f} ({values[0]:.2f}-{values[-1]:.2f})"


def table(headers, rows) -> str:
    """A Markdown table; the first column is left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(headers) + " |",
             "|---|" + "---:|" * (len(headers) - 1)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_readme(heading: str, section: str):
    """Replace the section `heading` of bench/README.md (other sections are left alone)."""
    path = BENCH / "README.md"
    text = path.read_text(encoding="utf-8") if path.exists() else (
        "# Benchmarks\n\nOne section per script in bench/; each script writes its own section.\n")
    start = text.find(heading + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + section + ("" if end < 0 else text[end:])
    path.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
    print(f"wrote the section {heading!r} of {path}")


# ----------------------------------------------------------------------------------------------
# Running jobs in fresh processes

def evaluate(repo, heldout, name, model_args) -> dict:
    """Our evaluation.py on the held-out set (retrieval metrics of a checkpoint or weights file)."""
    output = OUT / "runs" / f"eval-{name}.json"
    subprocess.run([sys.executable, str(repo / "evaluation.py"), *model_args, "--data", str(heldout),
                    "--output", str(output), "--num_workers", "0"], cwd=OUT, check=True,
                   stdout=subprocess.DEVNULL)
    return json.loads(output.read_text())["retrieval"]


def rerun() -> str:
    """The command that ran this benchmark, as its README section quotes it."""
    return "`" + " ".join([".venv/bin/python", f"bench/{Path(sys.argv[0]).name}", *map(shlex.quote, sys.argv[1:])]) + "`"


def run_job(job: str, params: dict, env: dict = None, repo: Path = REPO, log_name: str = None) -> dict:
    """Run JOB (a function of this file named _job_JOB) in a fresh process; its result plus
    `wall_s` (the process from start to exit) and `peak_mib` (its peak resident memory). The job's
    output goes to bench/out/logs/; a failing job stops the benchmark with the tail of that log."""
    log = OUT / "logs" / f"{log_name or job}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log, "w") as output:
        process = subprocess.Popen(
            [sys.executable, __file__, job, json.dumps({**params, "repo": str(repo)})],
            stdout=output, stderr=subprocess.STDOUT, cwd=OUT, env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    lines = log.read_text(errors="replace").splitlines()
    result = next((line for line in reversed(lines) if line.startswith(RESULT_MARK)), None)
    if os.waitstatus_to_exitcode(status) or result is None:
        tail = "\n".join(lines[-25:])
        sys.exit(f"job {job} {params} failed (exit code {os.waitstatus_to_exitcode(status)}); "
                 f"the end of {log}:\n{tail}")
    return {**json.loads(result[len(RESULT_MARK):]), "wall_s": wall,
            "peak_mib": usage.ru_maxrss / 1024}   # ru_maxrss is in KiB on Linux


_run_numbers = itertools.count()


def train_argv(data, *flags, repo: Path = REPO) -> list:
    """train.py's arguments for a benchmark run: the repository's config.json, the data, the given
    flags, and a new run name with its folders under bench/out/runs/ (deleted by nobody: small)."""
    run = f"bench-{os.getpid()}-{time.strftime('%H%M%S')}-{next(_run_numbers)}"
    runs = OUT / "runs"
    return ["--config", str(repo / "config.json"), "--data_dir", str(data), "--run_name", run,
            "--checkpoint_dir", str(runs / "checkpoints"), "--log_dir", str(runs / "logs"),
            "--results_dir", str(runs / "results"), *map(str, flags)]


def alternate(sides: dict, rounds: int, on_result=None) -> dict:
    """Run every side (name -> function returning a result dict) `rounds` times, in an order that
    alternates (A B, B A, A B, ...) so that a drifting load affects all sides alike.
    Returns name -> list of results, in round order."""
    results = {name: [] for name in sides}
    names = list(sides)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            results[name].append(sides[name]())
            if on_result:
                on_result(name, r, results[name][-1])
    return results


def _finish(result: dict):
    print(RESULT_MARK + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------
# Jobs: each runs in its own process (see run_job)

def bare_loop(model_name="tiny-vit-64", batch_size=64, precision="fp32", steps=20, warmup=0,
              grad_checkpointing=False, patch_dropout=0.0, compile=False, channels_last=False,
              fused=False, threads=0, malloc=False, repo=REPO, **_) -> dict:
    """Samples/s of forward, loss, backward and AdamW step on one batch of tensors in memory.

    Everything train.py's step does to the model is here (its loss, its AdamW parameter groups,
    autocast for bf16), nothing around it. fused=True uses torch's fused AdamW kernel instead of
    its default (a loop over the parameters on a CPU). malloc=True keeps freed memory for the next
    step as train.py does (runtime.tune_malloc). The first `warmup` steps are not timed (torch.compile
    compiles during them); with warmup=0 the first step, as in train.py, is counted."""
    sys.path.insert(0, str(repo))
    import torch

    import clip_model
    import runtime
    import train_step
    if malloc:
        runtime.tune_malloc()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    setup = clip_model.build_model(model_name, loss="clip", patch_dropout=patch_dropout,
                                   grad_checkpointing=grad_checkpointing)
    model = setup.model.train()
    size = setup.preprocess_cfg["size"]
    size = size if isinstance(size, int) else size[0]
    images = torch.randn(batch_size, 3, size, size)
    captions = ["a small red circle on the left", "a blue square and a green star at the top"]
    texts = setup.tokenizer([captions[i % 2] for i in range(batch_size)])
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    ids = torch.arange(batch_size)
    loss_fn = clip_model.create_loss("clip")
    optimizer = torch.optim.AdamW(train_step.parameter_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.98),
                                  eps=1e-6, **({"fused": True} if fused else {}))
    step_model = torch.compile(model) if compile else model

    model_s = [0.0]

    def step():
        started = time.perf_counter()
        with clip_model.autocast("cpu", precision):
            out = step_model(images, texts)
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"], ids)
        loss.backward()
        model_s[0] += time.perf_counter() - started
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clip_model.clamp_logit_scale(model)
        return loss

    compile_started = time.perf_counter()
    for _ in range(warmup):
        step()
    started, model_s[0] = time.perf_counter(), 0.0
    for _ in range(steps):
        loss = step()
    elapsed = time.perf_counter() - started
    return {"samples_per_s": steps * batch_size / elapsed, "step_s": elapsed / steps,
            "model_s": model_s[0], "loop_s": elapsed,
            "warmup_s": started - compile_started, "loss": float(loss),
            "threads": torch.get_num_threads()}


def _job_bare(params):
    _finish(bare_loop(**params))


def _job_train(params):
    """train.main(argv), timed by train.py itself (the `timing` it returns): start-up until the
    first step, then the loop -- every step, epoch boundary, log line, TensorBoard point,
    periodic checkpoint and best.pt save -- with the time of validation and of waiting for data
    reported on their own. torch is not imported here before train.main runs, so that train.py's
    own start-up happens as on the command line."""
    sys.path.insert(0, params["repo"])
    import train
    result = train.main(params["argv"])
    import torch
    timing, history = result["timing"], result["history"]["train"]
    loop_s = timing["loop_s"] - timing["validation_s"]
    _finish({"timing": timing, "steps": result["step"], "samples": timing["samples"], "loop_s": loop_s,
             "samples_per_s": timing["samples"] / loop_s, "startup_s": timing["startup_s"],
             "validation_s": timing["validation_s"], "validations": len(result["history"]["val"]),
             "data_s": timing["data_wait_s"], "checkpoint_s": timing["checkpoint_s"],
             "model_s": loop_s - timing["data_wait_s"] - timing["checkpoint_s"],
             "data_wait": statistics.mean(e["data_wait"] for e in history),
             "data_wait_max": max(e["data_wait"] for e in history),
             "threads": torch.get_num_threads(), "final_loss": history[-1]["loss"],
             "retrieval": result["history"]["val"][-1]["retrieval"] if result["history"]["val"] else None,
             "checkpoint_dir": str(result["checkpoint_dir"])})


def _job_train_eval(params):
    """train.main(argv), then the retrieval metrics of its final weights -- and of their moving
    average, when the run kept one (--ema_decay) -- on params["eval"], by evaluation.py's code;
    the run's timing beside them."""
    sys.path.insert(0, params["repo"])
    import clip_model
    import data_loader
    import evaluation
    import train
    result = train.main(params["argv"])
    last = result["checkpoint_dir"] / "last.pt"
    setup, checkpoint = clip_model.model_from_checkpoint(last)
    index = data_loader.load_caption_index(params["eval"])
    out = {"raw": evaluation.evaluate_model(setup, index)["retrieval"], "timing": result["timing"],
           "checkpoint": str(last)}
    if checkpoint.get("ema"):
        averaged = {k[len("module."):]: v for k, v in checkpoint["ema"].items() if k.startswith("module.")}
        setup.model.load_state_dict(averaged)
        out["ema"] = evaluation.evaluate_model(setup, index)["retrieval"]
    _finish(out)


def _job_open_clip_train(params):
    """open_clip's own trainer, `python -m open_clip_train.main ARGV`, with our presets
    (model_configs/*.json) registered first, timed like _job_train: from the start of the first
    epoch to the end (checkpoints included), without the time of its evaluate()."""
    sys.path.insert(0, params["repo"])
    try:
        import open_clip
        import open_clip_train.main as peer
    except ImportError as error:
        sys.exit(f"open_clip_train cannot be imported ({error}): it needs pandas and braceexpand, "
                 f"which open_clip_torch does not install; `pip install pandas braceexpand`")
    open_clip.add_model_config(Path(params["repo"]) / "model_configs")
    marks = {"evaluate_s": 0.0}
    train_one_epoch = peer.train_one_epoch

    def timed_epoch(*args, **kwargs):
        marks.setdefault("loop_start", time.perf_counter())
        return train_one_epoch(*args, **kwargs)

    peer.train_one_epoch = timed_epoch
    _timed(peer, "evaluate", marks, "evaluate_s")
    started = time.perf_counter()
    peer.main(params["argv"])
    loop_s = time.perf_counter() - marks["loop_start"] - marks["evaluate_s"]
    import torch
    _finish({"loop_s": loop_s, "startup_s": marks["loop_start"] - started,
             "validation_s": marks["evaluate_s"], "threads": torch.get_num_threads()})


def _timed(module, name: str, marks: dict, key: str):
    """Replace module.name by a wrapper that adds the seconds spent in it to marks[key]."""
    function = getattr(module, name)

    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            marks[key] += time.perf_counter() - started

    setattr(module, name, timed)


def _job_snapshots(params):
    """A trainer run unchanged (`trainer`: "train.py" runs train.main(argv); "open_clip_train"
    runs open_clip_train.main.main(argv) with our presets registered), with a copy of the
    model's weights taken every `every` optimiser steps. Each copy records its step, the seconds
    since this process started (imports, data, model, training, the trainer's own validations
    and checkpoints; less the time of the copies themselves) and the seconds spent validating so
    far. The copies are written after the run to `out`/step_NNNNN.pt ({"state_dict": ...}, which
    open_clip.create_model(name, pretrained=file) loads), so the files cost the run nothing.

    Neither trainer is touched: the copies come from torch's global optimizer step hook, and the
    model is the first module with a logit scale and an image tower that runs forward. A trainer
    module is imported before torch, so its own start-up happens as on the command line. train.py's
    --time_budget counts from main(); the seconds this job spent before it are taken off the budget,
    so that the budget counts from the job's start, as the copies' times do."""
    started = time.perf_counter()
    sys.path.insert(0, params["repo"])
    marks = {"validation_s": 0.0}
    if params["trainer"] == "train.py":
        import evaluation
        import train as trainer
        _timed(evaluation, "evaluate_model", marks, "validation_s")
    else:
        import open_clip
        import open_clip_train.main as trainer
        open_clip.add_model_config(Path(params["repo"]) / "model_configs")
        _timed(trainer, "evaluate", marks, "validation_s")
    import torch
    from torch.nn.modules.module import register_module_forward_pre_hook
    from torch.optim.optimizer import register_optimizer_step_post_hook
    found, snapshots, paused = {}, [], [0.0]

    def find_model(module, args):
        if "model" not in found and hasattr(module, "logit_scale") and hasattr(module, "visual"):
            found["model"] = module

    def after_step(optimizer, args, kwargs):
        found["steps"] = found.get("steps", 0) + 1
        if found["steps"] % params["every"] == 0:
            copy_started = time.perf_counter()
            weights = {k: v.detach().clone() for k, v in found["model"].state_dict().items()}
            snapshots.append({"step": found["steps"], "weights": weights,
                              "elapsed_s": copy_started - started - paused[0],
                              "validation_s": marks["validation_s"]})
            paused[0] += time.perf_counter() - copy_started

    model_hook = register_module_forward_pre_hook(find_model)
    register_optimizer_step_post_hook(after_step)
    argv = list(params["argv"])
    if "--time_budget" in argv:     # train.py's clock starts in main(): the time before it is spent
        at = argv.index("--time_budget") + 1
        argv[at] = f"{float(argv[at].rstrip('s')) - (time.perf_counter() - started):.2f}s"
    trainer.main(argv)
    model_hook.remove()
    out = Path(params["out"])
    out.mkdir(parents=True, exist_ok=True)
    for snapshot in snapshots:
        snapshot["path"] = str(out / f"step_{snapshot['step']:05d}.pt")
        torch.save({"state_dict": snapshot.pop("weights")}, snapshot["path"])
    _finish({"snapshots": snapshots, "steps": found.get("steps", 0),
             "total_s": time.perf_counter() - started - paused[0],
             "validation_s": marks["validation_s"], "threads": torch.get_num_threads()})


def _job_loader(params):
    """Images/s that train.py's DataLoader delivers on its own (no model): the data set (with its
    image cache and token table unless params["cache"] is false), sampler and DataLoader built as train.py builds
    them, iterated for `epochs` whole epochs; the cache's build time is reported apart."""
    sys.path.insert(0, params["repo"])
    import torch

    import clip_model
    import data_loader
    from augmentation import TrainAugmentation
    if params.get("threads"):
        torch.set_num_threads(params["threads"])
    setup = clip_model.build_model(params.get("model_name", "tiny-vit-64"))
    index = data_loader.load_caption_index(params["data"])
    augmentation = TrainAugmentation(setup.preprocess_cfg)
    started, cache, tokens = time.perf_counter(), None, None
    if params.get("cache", True):
        index, cache, tokens = data_loader.cache_training_data(index, augmentation, setup.tokenizer,
                                                               params["num_workers"])
    cache_s = time.perf_counter() - started
    dataset = data_loader.TrainDataset(index, augmentation, setup.tokenizer, seed=0, cache=cache, tokens=tokens)
    loader = data_loader.EpochLoader(dataset, params["batch_size"], num_workers=params["num_workers"])
    images, started = 0, time.perf_counter()
    for epoch in range(params["epochs"]):
        loader.set_epoch(epoch)
        for batch in loader:
            images += len(batch["image_ids"])
    elapsed = time.perf_counter() - started
    _finish({"images_per_s": images / elapsed, "images": images, "seconds": elapsed, "cache_s": cache_s})


if __name__ == "__main__":
    job, job_params = sys.argv[1], json.loads(sys.argv[2])
    globals()[f"_job_{job}"](job_params)
