"""The process around a training run: threads and memory, processes, device, the run's name,
folders, lock and log, and the signals that stop it cleanly. train.main() calls start_run first
and close_run last; what is in between is training.
"""
import ctypes
import datetime
import json
import logging
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import clip_model
import data_loader
import distillation
import files
import reporting
from errors import OutputError, SettingsError, disk_full_message, is_disk_full
from settings import DEFAULT_DATA_DIR

# ----------------------------------------------------------------------------------------------
# Threads and memory: set before torch starts its threads, and before the first step


def tune_openmp(cfg, relaunch):
    """Let OpenMP's threads spin briefly after each operation when DataLoader workers decode
    images beside the model: the default long spin holds the cores the workers need, while it is
    the fastest when the model has the cores to itself (batches built from the image cache in
    this process). Measured in bench/README.md (bench_data.py's thread table). A value of the
    user's own wins.

    OpenMP reads the setting once, when torch loads it, which is before any of this runs; so the
    `python train.py` process that needs it (`relaunch`) starts again with it, once: os.execv
    keeps the process, its command line and the rest of its environment (under torchrun too).
    """
    if "GOMP_SPINCOUNT" in os.environ or not cfg.num_workers or cfg.cache_images:
        return
    os.environ["GOMP_SPINCOUNT"] = "1000"
    if relaunch:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, sys.orig_argv)


# glibc's mallopt parameters
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_MAX = 32 << 20    # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit systems
KEEP_FREED = 1 << 30


def tune_malloc():
    """Keep the memory a training step frees for the next step (glibc's malloc only).

    A step allocates and frees the same activation buffers every time. By default glibc serves
    large blocks with fresh pages from the kernel (mmap, under an adaptive threshold) and returns
    free heap to the kernel, so every step faults its buffers in again and the kernel zeroes each
    page. Fixed thresholds (blocks up to 32 MiB from the heap, up to 1 GiB of free heap kept)
    leave the buffers in place for the next step, at the cost of a little more peak memory
    (bench/README.md, bench_peer.py). A setting of the user's own (MALLOC_*_ or GLIBC_TUNABLES in
    the environment) wins; without glibc (macOS, musl) nothing changes."""
    if any(name.startswith("MALLOC_") or name == "GLIBC_TUNABLES" for name in os.environ):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
        libc.mallopt(M_TRIM_THRESHOLD, KEEP_FREED)
    except (OSError, AttributeError):
        pass


# ----------------------------------------------------------------------------------------------
# The run: processes, device, name, folders, lock, log

@dataclass
class Run:
    """The processes, device and folders of a run, and where it reports."""
    name: str
    device: object
    precision: str
    rank: int
    world_size: int
    checkpoint_dir: Path
    log_dir: Path
    results_dir: Path
    log: logging.Logger
    reports: object = None             # reporting.Reports, rank 0 only, opened once the run has resumed
    lock: object = None                # the run folder's lock, rank 0 only

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def start_run(cfg):
    """Processes, device and precision, the run's name, folders, lock and log.

    Everything that can be known to be wrong before the data and model are loaded is checked
    here: the device, the precision, the paths given, the distillation settings, the packages the
    reports need, the output folders.
    """
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = clip_model.pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    precision = clip_model.pick_precision(cfg.precision, device)
    check_paths(cfg)
    distillation.check_distillation(cfg)
    reporting.check_report_to(cfg)
    if distributed:
        init_distributed(device)
    rank, world_size = clip_model.world_info()
    name = run_name(cfg, distributed)
    folders = [Path(cfg.checkpoint_dir) / name, Path(cfg.log_dir) / name, Path(cfg.results_dir) / name]
    lock = prepare_folders(cfg, folders) if rank == 0 else None
    log = setup_logging(folders[1] / "train.log", rank == 0)
    log.info(f"run {name}: device {device}, precision {precision}, {world_size} process(es)")
    return Run(name, device, precision, rank, world_size, *folders, log=log, lock=lock)


def check_paths(cfg):
    """The input paths given exist (the default data set is generated on first use)."""
    for name in ("data_dir", "val_data"):
        value = getattr(cfg, name)
        if value and value != DEFAULT_DATA_DIR and not data_loader.is_webdataset(value) and not Path(value).exists():
            raise SettingsError(f"{name} {value}: no such file or folder")
    if cfg.val_zeroshot and not Path(cfg.val_zeroshot).is_dir():
        raise SettingsError(f"val_zeroshot {cfg.val_zeroshot}: no such folder (one folder of images per class)")
    if cfg.best_metric.startswith("zeroshot/") and not cfg.val_zeroshot:
        raise SettingsError(f"best_metric {cfg.best_metric} needs --val_zeroshot DIR")
    if cfg.resume not in ("", "auto") and not Path(cfg.resume).is_file():
        raise SettingsError(f"resume {cfg.resume}: no such checkpoint file (or use --resume auto)")
    if looks_like_a_file(cfg.pretrained) and not Path(cfg.pretrained).is_file():
        raise SettingsError(f"pretrained {cfg.pretrained}: no such weights file")
    # a teacher's path that is not there reads as a model name; its weights' path matters only
    # then (distillation.check_distillation says what does not fit together)
    if cfg.distill_from and distillation.teacher_kind(cfg.distill_from) == "name":
        if looks_like_a_file(cfg.distill_from) and not Path(cfg.distill_from).exists():
            raise SettingsError(f"distill_from {cfg.distill_from}: no such checkpoint, model folder or "
                                f"config file")
        if looks_like_a_file(cfg.distill_pretrained) and not Path(cfg.distill_pretrained).is_file():
            raise SettingsError(f"distill_pretrained {cfg.distill_pretrained}: no such weights file")


def looks_like_a_file(value):
    """Whether a setting that takes a name or a path (a pretrained tag or a weights file, a model
    name or a checkpoint) was given a path."""
    return os.sep in value or value.endswith((".pt", ".pth", ".bin", ".safetensors"))


def init_distributed(device):
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # Validation runs on rank 0 while the others wait: allow it more than the default timeout.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(hours=2))


def run_name(cfg, distributed):
    model = re.sub(r"[^\w.+=@-]", "-", Path(cfg.model_name).stem).lstrip(".") or "run"
    name = [cfg.run_name or f"{model}-{time.strftime('%Y%m%d-%H%M%S')}"]
    if distributed:
            dist.broadcast_object_list(name, src=0)        # every rank uses rank 0's timestamp
    return name[0]


def prepare_folders(cfg, folders):
    """Create the run's folders, take the run's lock, refuse to overwrite a finished or running
    run, and write the settings into each folder. Returns the lock (held until the run ends)."""
    checkpoint_dir = folders[0]
    for folder, setting in zip(folders, ("checkpoint_dir", "log_dir", "results_dir")):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OutputError(f"cannot create {folder} ({error.strerror}); choose another "
                              f"--{setting}") from None
    lock = lock_run_folder(checkpoint_dir)
    for stale in checkpoint_dir.glob(".*.tmp"):        # left by a run killed while saving
        stale.unlink()
    if not cfg.resume and (checkpoint_dir / "last.pt").exists():
        raise OutputError(f"{checkpoint_dir / 'last.pt'} exists: continue that run with --resume "
                          f"auto, or pick another --run_name")
    for folder, setting in zip(folders, ("checkpoint_dir", "log_dir", "results_dir")):
        try:
            (folder / "config.json").write_text(json.dumps(vars(cfg), indent=2))
        except OSError as error:
            reason = disk_full_message(error, folder) if is_disk_full(error) else \
                f"{folder} is not writable ({error.strerror}); choose another --{setting}"
            raise OutputError(reason) from None
    return lock


def lock_run_folder(folder):
    """Hold an exclusive lock on the run's checkpoint folder while the run lives, so that a second
    run with the same name is refused instead of mixing its files with this one's."""
    handle = files.lock(folder)
    if handle is None:
        raise OutputError(f"run folder {folder} is in use by another running train.py; wait for it "
                          f"to end, or choose another --run_name")
    return handle


def close_run(run, failed=False):
    if run.reports is not None:
        run.reports.close(failed)
    if run.lock is not None:
        os.close(run.lock)                               # releases the lock
    if run.distributed and dist.is_initialized():
        dist.destroy_process_group()


def setup_logging(log_file, is_main):
    """Our own logger (open_clip logs chatty INFO lines to the root logger); only rank 0 writes
    the log file, other ranks print warnings only."""
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    handlers = [logging.StreamHandler(sys.stdout)]
    if is_main:
        handlers.append(logging.FileHandler(log_file))
    log = logging.getLogger("train")
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    for handler in handlers:
        handler.setFormatter(formatter)
        log.addHandler(handler)
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    log.propagate = False
    return log


class StopRequest:
    """Turns SIGTERM and Ctrl-C into a flag the loop checks after each step, so the run saves
    last.pt and exits cleanly instead of dying mid-update. DataLoader workers run in process
    groups of their own (data_loader._init_worker), so a signal to the whole process group, as
    schedulers and `timeout` send, reaches this process alone. A second signal aborts at once."""

    def __init__(self):
        self.reason = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        if self.reason is not None:          # a second Ctrl-C: stop right now
            raise KeyboardInterrupt
        self.reason = signal.Signals(signum).name

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def share(run, value):
    """Every process takes rank 0's integer (a planned step, for instance)."""
    if not run.distributed:
        return value
    decision = torch.tensor([int(value)], device=run.device if run.device.type == "cuda" else "cpu")
    dist.broadcast(decision, src=0)
    return int(decision.item())


def agree(run, flag):
    """Every process takes rank 0's decision (to stop, for instance)."""
    return bool(share(run, int(flag)))


def available_memory():
    """Bytes of memory available to new allocations (Linux: MemAvailable; else the free pages)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
