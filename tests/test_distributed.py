"""Specification of training on many processes (CPU, gloo): the gathered losses give the gradient
of one big batch, and train.py runs under torchrun. (How WebDataset shards share an epoch out
among ranks: tests/test_shards.py.)"""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import clip_model as cm
import sample_data
import train
import train_step

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
LOSSES = {"clip": ("clip", False), "clip local_loss": ("clip", True), "siglip": ("siglip", False)}


# ----------------------------------------------------------------------------- gathered losses

class TwoTowers(nn.Module):
    """The smallest CLIP: linear image and text towers into a shared space, a learned temperature
    and, for SigLIP, a learned bias."""

    def __init__(self, siglip: bool):
        super().__init__()
        torch.manual_seed(0)
        self.image, self.text = nn.Linear(6, 4), nn.Linear(5, 4)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-2.0)) if siglip else None
        self.double()  # float64: the comparison can be exact to 1e-12

    def forward(self, images, texts):
        return (F.normalize(self.image(images), dim=-1), F.normalize(self.text(texts), dim=-1),
                self.logit_scale.exp(), self.logit_bias)


def global_batch():
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(8, 6, generator=generator, dtype=torch.float64)
    texts = torch.randn(8, 5, generator=generator, dtype=torch.float64)
    ids = torch.tensor([0, 1, 2, 3, 4, 5, 0, 6])  # image 0 on both ranks: a positive across processes
    return images, texts, ids


def parameter_gradients(model, loss_name, images, texts, ids):
    loss, local_loss = LOSSES[loss_name]
    image_features, text_features, scale, bias = model(images, texts)
    cm.create_loss(loss, local_loss=local_loss)(image_features, text_features, scale, ids, bias).backward()
    return {name: p.grad.clone() for name, p in cm.unwrap(model).named_parameters()}


def _rank_gradients(rank, store, out):
    """One of two processes: its half of the global batch through DDP (which averages the
    gradients of the processes), for every loss."""
    torch.set_num_threads(1)  # as in DataLoader workers: no thread pool inherited across the fork
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    images, texts, ids = global_batch()
    half = slice(4 * rank, 4 * rank + 4)
    grads = {name: parameter_gradients(nn.parallel.DistributedDataParallel(TwoTowers(name == "siglip")), name,
                            images[half], texts[half], ids[half]) for name in LOSSES}
    torch.save(grads, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_gradients(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gloo")
    # fork: the children start at once with everything imported (spawn would import it all again)
    mp.start_processes(_rank_gradients, args=(str(folder / "store"), str(folder)), nprocs=2, start_method="fork")
    return [torch.load(folder / f"rank{rank}.pt") for rank in range(2)]


class DictTowers(TwoTowers):
    """TwoTowers answering as an open_clip model does (a dict), for train_step.backward_step."""

    def forward(self, images, texts):
        image_features, text_features, scale, bias = super().forward(images, texts)
        out = {"image_features": image_features, "text_features": text_features, "logit_scale": scale}
        return out if bias is None else {**out, "logit_bias": bias}


def accumulated_gradients(model, loss_name, micro_batches, steps=1):
    """Gradients of train_step.backward_step over micro-batches, after `steps` steps (the second step
    is where DDP complains about a parameter that got no gradient in the synchronised pass)."""
    loss, local_loss = LOSSES[loss_name]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for _ in range(steps):
        model.zero_grad()
        train_step.backward_step(model, cm.create_loss(loss, local_loss=local_loss), micro_batches, scaler,
                            "fp32", "cpu")
    return {name: p.grad.clone() for name, p in cm.unwrap(model).named_parameters()}


def _rank_accumulated_gradients(rank, store, out):
    """One of two processes: its half of the global batch as two micro-batches, through DDP."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    images, texts, ids = global_batch()
    micro = [{"images": images[s:s + 2], "texts": texts[s:s + 2], "image_ids": ids[s:s + 2]}
             for s in (4 * rank, 4 * rank + 2)]
    grads = {name: accumulated_gradients(nn.parallel.DistributedDataParallel(DictTowers(name == "siglip")),
                                         name, micro, steps=2) for name in LOSSES}
    torch.save(grads, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("loss_name", LOSSES)
def test_two_processes_of_two_micro_batches_get_the_gradient_of_the_whole_global_batch(loss_name, tmp_path):
    mp.start_processes(_rank_accumulated_gradients, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2,
                       start_method="fork")
    images, texts, ids = global_batch()
    expected = accumulated_gradients(DictTowers(loss_name == "siglip"), loss_name,
                                     [{"images": images, "texts": texts, "image_ids": ids}])
    for rank in range(2):
        grads = torch.load(tmp_path / f"rank{rank}.pt")[loss_name]
        assert grads.keys() == expected.keys() and "logit_scale" in grads    # the temperature too
        for name, grad in expected.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-10, atol=1e-12,
                                       msg=lambda m, rank=rank, name=name: f"rank {rank}, {name}: {m}")


@pytest.mark.parametrize("loss_name", LOSSES)
def test_two_processes_get_the_gradient_of_the_loss_on_the_concatenated_batch(loss_name, rank_gradients):
    expected = parameter_gradients(TwoTowers(loss_name == "siglip"), loss_name, *global_batch())
    for rank, grads in enumerate(rank_gradients):
        for name, grad in expected.items():
            torch.testing.assert_close(grads[loss_name][name], grad, rtol=1e-10, atol=1e-12,
                                       msg=lambda m, rank=rank, name=name: f"rank {rank}, {name}: {m}")


# ----------------------------------------------------------------------------- train.py under torchrun

@pytest.fixture(scope="module")
def sample_set(tmp_path_factory):
    return sample_data.create_sample_dataset(tmp_path_factory.mktemp("data") / "set", num_samples=200, seed=0)


def train_flags(data, out, *extra, batch_size=16):
    # 180 training images (20 are held out), an epoch of images, a global batch of 2 x 16: 5 steps per epoch
    return ["--data_dir", data["index"], "--sample_by", "image", "--model_name", "tiny-vit-64",
            "--batch_size", str(batch_size),
            "--num_workers", "0", "--max_steps", "6", "--warmup_steps", "2", "--log_every", "1",
            "--checkpoint_dir", str(out / "ckpt"), "--log_dir", str(out / "logs"),
            "--results_dir", str(out / "results"), "--tensorboard_pairs", "0", "--projector_pairs", "0", *extra]


def torchrun(args, cwd):
    done = subprocess.run([*TORCHRUN, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def torchrun_runs(sample_set, tmp_path_factory):
    """A 2-process run of 2 accumulated micro-batches of 8 stopped at step 3, then continued to
    step 6 with --resume auto; reported to TensorBoard and W&B (offline: tests/conftest.py)."""
    out = tmp_path_factory.mktemp("torchrun")
    accumulated = ("--accum_steps", "2", "--report_to", "tensorboard,wandb")
    first = torchrun(train_flags(sample_set, out, "--run_name", "dist", "--stop_at_step", "3", *accumulated,
                                 batch_size=8), out)
    first_log = (out / "logs/dist/train.log").read_text()
    shutil.copy(out / "ckpt/dist/last.pt", out / "step3.pt")
    second = torchrun(train_flags(sample_set, out, "--run_name", "dist", "--resume", "auto", *accumulated,
                                  batch_size=8), out)
    return out, first, first_log, second


def messages(log_text):
    return [line.split(" ", 1)[1] for line in log_text.splitlines()]  # without the time stamp


@pytest.mark.slow
def test_torchrun_trains_on_two_processes_logging_and_checkpointing_once(torchrun_runs):
    out, first, first_log, _ = torchrun_runs
    assert "2 process(es)" in first_log and "global batch of 32" in first_log
    lines = messages(first_log)
    assert len(lines) == len(set(lines)), "a log line was written twice"
    assert sum(line.startswith("INFO training ") and " steps " in line for line in lines) == 1
    assert first.stdout.count("INFO training 6 steps") == 1  # only rank 0 prints
    assert os.listdir(out / "ckpt") == ["dist"]
    assert cm.load_checkpoint(out / "step3.pt")["step"] == 3


@pytest.mark.slow
def test_resume_auto_under_torchrun_continues_the_run(torchrun_runs):
    out, _, first_log, second = torchrun_runs
    log = (out / "logs/dist/train.log").read_text()[len(first_log):]
    assert "resumed" in log and "at step 3" in log and "finished at step 6" in log
    assert second.stdout.count("finished at step 6") == 1
    last = cm.load_checkpoint(out / "ckpt/dist/last.pt")
    assert last["step"] == 6
    assert [e["step"] for e in last["history"]["train"]] == [1, 2, 3, 4, 5, 6]
    assert [e["step"] for e in last["history"]["val"]] == [5, 6]  # the end of epoch 0, the end
    assert sorted(os.listdir(out / "ckpt/dist")) == ["best.pt", "config.json", "last.pt"]


@pytest.mark.slow
def test_only_the_first_process_reports_to_wandb_and_the_resumed_job_continues_its_run(torchrun_runs):
    out, _, first_log, _ = torchrun_runs
    wandb_id = cm.load_checkpoint(out / "ckpt/dist/last.pt")["wandb_id"]
    parts = list((out / "logs/dist/wandb").glob("offline-run-*"))
    assert len(parts) == 2 and all(part.name.endswith(f"-{wandb_id}") for part in parts)   # one a job
    assert first_log.count("W&B run written offline") == 1
    assert (out / "logs/dist/train.log").read_text().count(f"offline-run-*-{wandb_id}") == 2


@pytest.mark.slow
def test_a_checkpoint_of_two_processes_resumes_on_one_with_the_same_global_batch(torchrun_runs, sample_set,
                                                                                 tmp_path):
    out, *_ = torchrun_runs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process has; two threads on a shared 2-core machine crawl
    try:
        single = train.main(train_flags(sample_set, tmp_path, "--run_name", "single", "--resume",
                                        str(out / "step3.pt"), batch_size=32))
    finally:
        torch.set_num_threads(threads)
    assert single["step"] == 6
    one = cm.load_checkpoint(tmp_path / "ckpt/single/last.pt")["state_dict"]
    two = cm.load_checkpoint(out / "ckpt/dist/last.pt")["state_dict"]
    # the same samples, loss and updates; only the order of float additions differs (the weights
    # end ~1e-7 apart, while three steps move them by ~1e-3)
    for name, tensor in two.items():
        torch.testing.assert_close(one[name], tensor, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.slow
def test_a_time_budget_under_torchrun_ends_every_process_at_the_step_rank_0_planned(sample_set, tmp_path):
    done = torchrun(train_flags(sample_set, tmp_path, "--run_name", "budget", "--max_steps", "0",
                                "--time_budget", "45s"), tmp_path)   # a rank that went on would hang
    # the budget counts from the start of the processes: two of them importing torch and open_clip
    # beside another test's work take ~25 s of it, and the steps must outlast the first plan
    results = json.loads((tmp_path / "results/budget/training_results.json").read_text())
    plans = results["time_budget"]["plans"]
    last = cm.load_checkpoint(tmp_path / "ckpt/budget/last.pt")
    assert plans and last["step"] == results["history"]["train"][-1]["step"] > plans[0]["step"]
    assert done.stdout.count(f"finished at step {last['step']}") == 1
