"""Specification of distillation: the term (clip_model.DistillationLoss) by hand, its gradient through
accumulated micro-batches and two processes, the teacher's own view of each sample, and whole runs
of train.py with a teacher: alone, accumulated, cached, resumed and under torchrun."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import augmentation
import clip_model as cm
import data_loader as dl
import distillation
import runtime
import sample_data
import settings
import train
import train_step
from errors import CheckpointError, ModelError, SettingsError

ROOT = Path(__file__).resolve().parent.parent
# A teacher unlike the student (tiny-vit-64: 128 wide, 64 px, 32 tokens, OpenAI's normalisation)
TEACHER_CONFIG = {"embed_dim": 96,
                  "vision_cfg": {"image_size": 48, "patch_size": 8, "width": 96, "layers": 2, "head_width": 32,
                                 "mlp_ratio": 4.0},
                  "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 96, "heads": 4, "layers": 2}}
TEACHER_PREPROCESS = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


def features(rows):
    return torch.tensor(rows, dtype=torch.float64)


# ----------------------------------------------------------------------------- the term by hand

def test_the_term_of_a_3x3_example_is_the_kl_computed_by_hand():
    # Both models put image i and text i at the same unit vector e_i: x_i . y_j = 1 if i = j else 0.
    # Student scale 2, teacher scale 4, T = 2: the logits / T are 1 (student) and 2 (teacher) on the
    # diagonal, 0 elsewhere, so every row and every column has
    #   Q = (e, 1, 1) / (e + 2)          P = (e^2, 1, 1) / (e^2 + 2)
    # and KL = P_ii log(P_ii / Q_ii) + 2 P_ij log(P_ij / Q_ij), the same in both directions.
    e = math.e
    q_ii, q_ij, p_ii, p_ij = e / (e + 2), 1 / (e + 2), e ** 2 / (e ** 2 + 2), 1 / (e ** 2 + 2)
    kl = p_ii * math.log(p_ii / q_ii) + 2 * p_ij * math.log(p_ij / q_ij)
    assert kl == pytest.approx(0.098886, abs=1e-6)
    unit = features(np.eye(3))
    student = {"image_features": unit, "text_features": unit, "logit_scale": torch.tensor(2.0)}
    teacher = {"image_features": unit, "text_features": unit, "logit_scale": torch.tensor(4.0)}
    for local_loss in (False, True):                    # one process: local rows are all rows
        loss = cm.DistillationLoss(temperature=2.0, local_loss=local_loss)(student, teacher)
        assert loss.item() == pytest.approx(2 ** 2 * kl, rel=1e-12)   # times T^2


def test_the_two_directions_are_averaged():
    # 2-d features at angles: image i at a_i, text j at b_j, so x_i . y_j = cos(a_i - b_j) and the
    # rows (images -> texts) differ from the columns (texts -> images)
    def unit(angles):
        return features([[math.cos(a), math.sin(a)] for a in angles])
    images, texts, teacher_texts = unit([0.0, 1.0, 2.5]), unit([0.2, 1.5, 2.0]), unit([0.0, 1.0, 2.5])
    s, s_t, T = 5.0, 10.0, 4.0

    def softmax(row):
        exps = [math.exp(v) for v in row]
        return [v / sum(exps) for v in exps]

    def kl(p_rows, q_rows):
        return sum(p * math.log(p / q) for p_row, q_row in zip(p_rows, q_rows) for p, q in zip(p_row, q_row)) / 3
    S = [[s * float(images[i] @ texts[j]) / T for j in range(3)] for i in range(3)]
    S_t = [[s_t * float(images[i] @ teacher_texts[j]) / T for j in range(3)] for i in range(3)]
    rows = kl([softmax(r) for r in S_t], [softmax(r) for r in S])
    columns = kl([softmax(c) for c in zip(*S_t)], [softmax(c) for c in zip(*S)])
    assert abs(rows - columns) > 0.005                       # a real asymmetry to average
    loss = cm.DistillationLoss(temperature=T)(
        {"image_features": images, "text_features": texts, "logit_scale": torch.tensor(s)},
        {"image_features": images, "text_features": teacher_texts, "logit_scale": torch.tensor(s_t)})
    assert loss.item() == pytest.approx(T ** 2 * (rows + columns) / 2, rel=1e-12)


def test_the_sigmoid_term_of_one_pair_is_the_binary_kl_by_hand():
    one = features([[1.0, 0.0]])
    student = {"image_features": one, "text_features": one, "logit_scale": torch.tensor(3.0),
               "logit_bias": torch.tensor(-1.0)}
    teacher = {"image_features": one, "text_features": one, "logit_scale": torch.tensor(9.0),
               "logit_bias": torch.tensor(-3.0)}
    T = 2.0
    q, p = 1 / (1 + math.exp(-(3 - 1) / T)), 1 / (1 + math.exp(-(9 - 3) / T))
    by_hand = p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    loss = cm.DistillationLoss(temperature=T, sigmoid=True)(student, teacher)
    assert loss.item() == pytest.approx(T ** 2 * by_hand, rel=1e-12)


@pytest.mark.parametrize("sigmoid", [False, True])
def test_a_student_that_agrees_with_its_teacher_gets_zero_loss_and_zero_gradient(sigmoid):
    generator = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(6, 5, generator=generator, dtype=torch.float64), dim=-1).requires_grad_()
    y = F.normalize(torch.randn(6, 5, generator=generator, dtype=torch.float64), dim=-1).requires_grad_()
    scale, bias = torch.tensor(7.0, dtype=torch.float64, requires_grad=True), torch.tensor(-2.0, dtype=torch.float64)
    student = {"image_features": x, "text_features": y, "logit_scale": scale, "logit_bias": bias}
    teacher = {k: v.detach() for k, v in student.items()}
    loss = cm.DistillationLoss(temperature=4.0, sigmoid=sigmoid, feature_dims=(5, 5))(student, teacher)
    loss.backward()
    assert abs(loss.item()) < 1e-12
    for grad in (x.grad, y.grad, scale.grad):
        assert grad.abs().max() < 1e-12


def test_the_T_squared_factor_keeps_the_gradient_of_the_term_at_any_temperature():
    # For large T the gradient with respect to a student logit tends to (z - z') / B: the same at
    # T = 50 as at T = 100. Without the factor it would fall by 4 from one to the other.
    generator = torch.Generator().manual_seed(1)
    x, y = (F.normalize(torch.randn(8, 4, generator=generator, dtype=torch.float64), dim=-1) for _ in range(2))
    x_t, y_t = (F.normalize(torch.randn(8, 4, generator=generator, dtype=torch.float64), dim=-1) for _ in range(2))
    gradients = []
    for T in (50.0, 100.0):
        scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
        cm.DistillationLoss(temperature=T)({"image_features": x, "text_features": y, "logit_scale": scale},
                                           {"image_features": x_t, "text_features": y_t,
                                            "logit_scale": torch.tensor(10.0)}).backward()
        gradients.append(scale.grad.item())
    assert gradients[0] == pytest.approx(gradients[1], rel=0.01) and abs(gradients[0]) > 1e-3


def test_the_feature_map_exists_only_between_different_widths_and_keeps_lengths_at_first():
    assert cm.DistillationLoss(feature_dims=(128, 128)).map is None
    assert cm.DistillationLoss().map is None
    M = cm.DistillationLoss(feature_dims=(64, 96)).map
    assert M.shape == (96, 64)
    x = F.normalize(torch.randn(10, 64), dim=-1)
    torch.testing.assert_close((x @ M.T).norm(dim=-1), torch.ones(10))


# ----------------------------------------------------------------------------- accumulated and distributed

class Towers(nn.Module):
    """The smallest CLIP, answering as an open_clip model does: linear towers into a space of
    `width`, a learned temperature and, for SigLIP, a learned bias; float64 for exact comparisons."""

    def __init__(self, width, seed, siglip):
        super().__init__()
        torch.manual_seed(seed)
        self.image, self.text = nn.Linear(6, width), nn.Linear(5, width)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-2.0)) if siglip else None
        self.double()

    def forward(self, images, texts):
        out = {"image_features": F.normalize(self.image(images), dim=-1),
               "text_features": F.normalize(self.text(texts), dim=-1), "logit_scale": self.logit_scale.exp()}
        return out if self.logit_bias is None else {**out, "logit_bias": self.logit_bias}


LOSSES = {"clip": ("clip", False), "clip local_loss": ("clip", True), "siglip": ("siglip", False)}


def distillation_setup(loss_name):
    """A student, a narrower teacher (feature map 4 -> 3) and their Distillation, built the same
    way in every process."""
    loss, local_loss = LOSSES[loss_name]
    siglip = loss == "siglip"
    student, teacher = Towers(4, seed=0, siglip=siglip), Towers(3, seed=7, siglip=siglip).requires_grad_(False)
    torch.manual_seed(3)
    term = cm.DistillationLoss(2.0, sigmoid=siglip, local_loss=local_loss, feature_dims=(4, 3)).double()
    distill = distillation.Distillation(teacher=SimpleNamespace(model=teacher), view=None, loss_fn=term, weight=0.4)
    return student, distill, cm.create_loss(loss, local_loss=local_loss)


def batch_of_8():
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(8, 6, generator=generator, dtype=torch.float64)
    texts = torch.randn(8, 5, generator=generator, dtype=torch.float64)
    ids = torch.tensor([0, 1, 2, 3, 4, 5, 0, 6])  # image 0 twice, on both ranks
    return {"images": images, "texts": texts, "image_ids": ids, "teacher_images": images, "teacher_texts": texts}


def split(batch, start, stop):
    return {name: value[start:stop] for name, value in batch.items()}


def distilled_gradients(model, distill, loss_fn, micro_batches):
    """Gradients of the student's parameters and of the feature map after backward_step."""
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for _ in range(2):         # the second step is where DDP would miss a parameter left without gradient
        model.zero_grad()
        distill.loss_fn.zero_grad()
        terms = train_step.backward_step(model, loss_fn, micro_batches, scaler, "fp32", "cpu", distill)
    grads = {name: p.grad.clone() for name, p in cm.unwrap(model).named_parameters()}
    return {**grads, "map": distill.loss_fn.map.grad.clone()}, terms


def _rank_gradients(rank, store, out):
    """One of two processes: its half of the batch as two micro-batches of 2, through DDP."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    results = {}
    for name in LOSSES:
        student, distill, loss_fn = distillation_setup(name)
        micro = [split(batch_of_8(), s, s + 2) for s in (4 * rank, 4 * rank + 2)]
        results[name] = distilled_gradients(nn.parallel.DistributedDataParallel(student), distill, loss_fn, micro)[0]
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_gradients(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gloo")
    mp.start_processes(_rank_gradients, args=(str(folder / "store"), str(folder)), nprocs=2, start_method="fork")
    return [torch.load(folder / f"rank{rank}.pt") for rank in range(2)]


@pytest.mark.parametrize("loss_name", LOSSES)
def test_four_micro_batches_give_the_distilled_gradient_of_the_whole_batch(loss_name):
    student, distill, loss_fn = distillation_setup(loss_name)
    expected, whole = distilled_gradients(student, distill, loss_fn, [batch_of_8()])
    student, distill, loss_fn = distillation_setup(loss_name)
    teacher_passes = []
    distill.teacher.model.register_forward_hook(lambda *_: teacher_passes.append(1))
    got, accumulated = distilled_gradients(student, distill, loss_fn, [split(batch_of_8(), s, s + 2)
                                                                      for s in range(0, 8, 2)])
    assert len(teacher_passes) == 2 * 4        # once per micro-batch in each of the two steps
    for name in ("loss", "contrastive", "distillation"):
        assert accumulated[name].item() == pytest.approx(whole[name].item(), rel=1e-12), name
    assert whole["distillation"].item() > 0.01
    for name, grad in expected.items():   # the temperature and the feature map counted once
        torch.testing.assert_close(got[name], grad, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("loss_name", LOSSES)
def test_two_processes_of_two_micro_batches_give_the_distilled_gradient_of_the_whole_batch(loss_name,
                                                                                           rank_gradients):
    student, distill, loss_fn = distillation_setup(loss_name)
    expected, _ = distilled_gradients(student, distill, loss_fn, [batch_of_8()])
    for rank, grads in enumerate(rank_gradients):
        assert grads[loss_name].keys() == expected.keys()
        for name, grad in expected.items():   # the map, outside DDP, gets the same gradient everywhere
            torch.testing.assert_close(grads[loss_name][name], grad, rtol=1e-10, atol=1e-12,
                                       msg=lambda m, rank=rank, name=name: f"rank {rank}, {name}: {m}")


# ----------------------------------------------------------------------------- the teacher's view of a sample

def test_the_teacher_sees_the_students_crop_and_caption_through_its_own_size_normalisation_and_tokenizer():
    rows, columns = np.mgrid[0:90, 0:120]
    pixels = np.zeros((90, 120, 3), dtype=np.uint8)   # squares of 15 px: where the crop falls shows
    pixels[(rows // 15 + columns // 15) % 2 == 1] = (230, 40, 20)
    student_tokenizer, teacher_tokenizer = (cm.CaptionTokenizer(cm.open_clip.get_tokenizer("ViT-B-32",
                                                                                           context_length=n))
                                            for n in (32, 16))
    strong = {"crop_min_scale": 0.5, "colour_jitter": 0.8}      # samples that differ, to tell apart
    student = augmentation.TrainAugmentation({"size": 32}, min_side=100, **strong)
    teacher = augmentation.TrainAugmentation({"size": 64, **TEACHER_PREPROCESS}, **strong)
    view = augmentation.TeacherView(teacher, teacher_tokenizer)
    dataset = SimpleNamespace(seed=0, augmentation=student, tokenizer=student_tokenizer, teacher_view=view)
    seen = []
    captions = ["red squares on black", "a chequered picture"]
    for i in range(6):
        (choice,), (draw,) = dl.draw_samples(dataset, 0, np.array([i]), np.array([-1]), np.array([2]),
                                             [pixels.shape[:2]])
        images, tokens, _, choice, teacher_images, teacher_tokens = dl.train_sample(
            dataset, i, int(choice), pixels, draw, captions[choice])
        assert teacher_images.shape == (3, 64, 64) and teacher_tokens.shape == (16,)
        assert torch.equal(teacher_tokens[:4], tokens[:4])     # the same caption, in 16 tokens
        shown = images / 255
        shown_to_teacher = F.interpolate(teacher_images[None] / 255, size=32, mode="area")[0]
        seen.append((shown, shown_to_teacher))
    for i, (_, shown_to_teacher) in enumerate(seen):   # the same crop and jitter at both sizes (~0.006) ...
        differences = [(shown - shown_to_teacher).abs().mean() for shown, _ in seen]
        assert differences[i] < 0.015, i
        assert min(differences[:i] + differences[i + 1:]) > 0.04, i   # ... and not another sample's (> 0.05)
    assert student.side >= 100                                  # prepared large enough for both


# ----------------------------------------------------------------------------- loading a teacher

@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """The teacher as an open_clip model folder and as a checkpoint of ours."""
    folder = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(5)
    setup = cm.build_model("teacher", model_config=TEACHER_CONFIG, preprocess_cfg=TEACHER_PREPROCESS)
    safetensors.torch.save_file(setup.model.state_dict(), folder / "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TEACHER_CONFIG,
                                                              "preprocess_cfg": TEACHER_PREPROCESS}))
    cm.save_checkpoint(folder / "teacher.pt", setup)
    return {"folder": folder, "checkpoint": folder / "teacher.pt", "setup": setup}


def test_a_teacher_loads_from_an_open_clip_model_folder_with_its_own_preprocessing(teacher):
    loaded = cm.model_from_folder(teacher["folder"])
    assert loaded.preprocess_cfg["mean"] == TEACHER_PREPROCESS["mean"] and loaded.tokenizer.context_length == 24
    images, texts = torch.randn(2, 3, 48, 48), loaded.tokenizer(["a red circle", "a blue star"])
    torch.testing.assert_close(loaded.model.eval()(images, texts)["text_features"],
                               teacher["setup"].model.eval()(images, texts)["text_features"])


def test_a_model_folder_without_weights_is_refused(tmp_path):
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TEACHER_CONFIG}))
    with pytest.raises(ModelError, match="no weights"):
        cm.model_from_folder(tmp_path)


class _Pickled:
    def __reduce__(self):
        return (print, ("pwned",))


def _truncated_weights(folder, state):
    safetensors.torch.save_file(state, folder / "open_clip_model.safetensors")
    data = (folder / "open_clip_model.safetensors").read_bytes()
    (folder / "open_clip_model.safetensors").write_bytes(data[:len(data) // 2])


HOSTILE_TEACHERS = {   # (open_clip_config.json, how the weights are written, the error and its message)
    ".bin pickle": ({"model_cfg": TEACHER_CONFIG},
                    lambda folder, state: torch.save({"x": _Pickled()}, folder / "open_clip_pytorch_model.bin"),
                    "CheckpointError", "NOT loaded: besides tensors it holds Python objects"),
    "list as config": ([TEACHER_CONFIG], None, "ModelError", "not an open_clip model folder"),
    "list as model_cfg": ({"model_cfg": [TEACHER_CONFIG]}, None, "CheckpointError",
                          "open_clip_config.json: its model_config is not an open_clip model config"),
    "unknown config key": ({"model_cfg": {**TEACHER_CONFIG, "evil": 1}}, None, "CheckpointError",
                           "open_clip cannot load this model folder .*unexpected keyword argument 'evil'"),
    "truncated safetensors": ({"model_cfg": TEACHER_CONFIG}, _truncated_weights, "CheckpointError",
                              "open_clip cannot load this model folder .*SafetensorError"),
    "embed_dim 2^40": ({"model_cfg": {**TEACHER_CONFIG, "embed_dim": 2 ** 40}}, None, "CheckpointError",
                       "'model_config.embed_dim' is 1099511627776, beyond any real model"),
}


@pytest.mark.parametrize("name", HOSTILE_TEACHERS)
def test_a_hostile_teacher_folder_is_refused_in_one_line_naming_the_teacher(name, teacher, tmp_path, capfd):
    config, write_weights, error, message = HOSTILE_TEACHERS[name]
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    state = teacher["setup"].model.state_dict()
    (write_weights or (lambda folder, state: safetensors.torch.save_file(
        state, folder / "open_clip_model.safetensors")))(tmp_path, state)
    cfg = settings.parse_config(["--distill_from", str(tmp_path)])
    with pytest.raises((CheckpointError, ModelError), match=message) as refused:
        distillation.load_teacher(cfg, "cpu")
    assert type(refused.value).__name__ == error
    assert str(refused.value).startswith(f"teacher (distill_from {tmp_path}): ") and "\n" not in str(refused.value)
    assert "pwned" not in capfd.readouterr().out


@pytest.mark.parametrize("kind", ["folder", "checkpoint"])
def test_a_nan_teacher_is_refused_when_it_is_loaded_naming_it(kind, teacher, tmp_path):
    # Loaded, it would make every distillation step non-finite, and the run would stop after
    # --max_bad_steps advising a lower learning rate: the wrong cause.
    setup = cm.build_model("teacher", model_config=TEACHER_CONFIG, preprocess_cfg=TEACHER_PREPROCESS)
    setup.model.load_state_dict(teacher["setup"].model.state_dict())
    with torch.no_grad():
        setup.model.visual.proj[0, 0] = float("nan")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TEACHER_CONFIG,
                                                                "preprocess_cfg": TEACHER_PREPROCESS}))
    safetensors.torch.save_file(setup.model.state_dict(), tmp_path / "open_clip_model.safetensors")
    cm.save_checkpoint(tmp_path / "teacher.pt", setup)
    source = tmp_path if kind == "folder" else tmp_path / "teacher.pt"
    cfg = settings.parse_config(["--distill_from", str(source)])
    with pytest.raises(CheckpointError, match=rf"teacher \(distill_from {source}\): 1 of its [0-9]+ weight "
                                              r"tensors hold NaN or infinite values \(the first: 'visual.proj'\)"):
        distillation.load_teacher(cfg, "cpu")
    assert distillation.load_teacher(settings.parse_config(["--distill_from", str(teacher["checkpoint"])]), "cpu")


@pytest.mark.parametrize("flags,message", [
    (["--distill_from", "ViT-B-32"], "random weights teaches nothing"),
    (["--distill_pretrained", "openai"], "without distill_from"),
    (["--distill_from", "ckpt/none.pt"], "no such checkpoint"),
    (["--distill_from", "ViT-B-32", "--distill_pretrained", "weights/none.safetensors"], "no such weights file"),
    (["--distill_from", "{checkpoint}", "--distill_cache"], "add --no-augment"),
    (["--distill_from", "{checkpoint}", "--distill_pretrained", "openai"], "drop --distill_pretrained"),
    # what does not fit is said before a path that is not there
    (["--distill_pretrained", "weights/none.safetensors"], "without distill_from"),
    (["--distill_from", "{checkpoint}", "--distill_pretrained", "weights/none.safetensors"],
     "drop --distill_pretrained"),
])
def test_distillation_settings_that_do_not_fit_are_refused_before_anything_loads(flags, message, teacher):
    cfg = settings.parse_config([f.format(checkpoint=teacher["checkpoint"]) for f in flags])
    with pytest.raises(SettingsError, match=message):
        runtime.check_paths(cfg)                   # the teacher's paths: checked with the others
        distillation.check_distillation(cfg)


def test_a_siglip_student_with_a_softmax_teacher_is_refused(teacher):
    cfg = settings.parse_config(["--loss", "siglip", "--distill_from", str(teacher["checkpoint"])])
    run = SimpleNamespace(device=torch.device("cpu"), log=None, distributed=False)
    with pytest.raises(SettingsError, match="needs a SigLIP teacher"):
        distillation.build_distillation(cfg, run, None)


# ----------------------------------------------------------------------------- whole runs

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return sample_data.create_sample_dataset(tmp_path_factory.mktemp("data") / "set", num_samples=200, seed=0)


def run_flags(data, out, *extra, batch_size=16):
    # 180 training images (20 held out), an epoch of images; global batch 32: 5 steps per epoch
    return ["--data_dir", str(data["index"]), "--sample_by", "image", "--num_workers", "0",
            "--batch_size", str(batch_size),
            "--warmup_steps", "1", "--log_every", "1", "--learning_rate", "2e-3",
            "--checkpoint_dir", str(out / "ckpt"), "--log_dir", str(out / "logs"),
            "--results_dir", str(out / "results"), "--tensorboard_pairs", "0", "--projector_pairs", "0", *extra]


def single_thread_main(argv):
    """train.main on one thread, as each torchrun process has (two threads on a shared 2-core
    machine crawl), so that runs compared with a torchrun run add up their floats alike."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train.main(argv)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_a_student_equal_to_its_teacher_learns_nothing_from_distillation_alone(data, tmp_path):
    torch.manual_seed(0)
    cm.save_checkpoint(tmp_path / "same.pt", cm.build_model("tiny-vit-64"))
    result = single_thread_main(run_flags(data, tmp_path, "--run_name", "same", "--max_steps", "1",
                                          "--pretrained", str(tmp_path / "same.pt"), "--distill_from",
                                          str(tmp_path / "same.pt"), "--distill_weight", "1"))
    first = result["history"]["train"][0]
    assert first["contrastive"] > 1.0             # the contrastive loss is far from 0 ...
    assert abs(first["distillation"]) < 1e-6      # ... the student already agrees with its teacher
    assert first["loss"] == pytest.approx(first["distillation"], abs=1e-9)
    assert first["grad_norm"] < 1e-4              # and nothing moves it (float32 rounding; alone the
    # contrastive loss has gradient norms of 1 to 10 here)


ACCUMULATED = ("--accum_steps", "2", "--max_steps", "3", "--save_every", "1000")   # feature term on by default


@pytest.fixture(scope="module")
def accumulated_run(data, teacher, tmp_path_factory):
    """3 steps of 2 accumulated micro-batches of 16 with the narrower teacher and the feature map."""
    out = tmp_path_factory.mktemp("accumulated")
    result = single_thread_main(run_flags(data, out, "--run_name", "whole", "--distill_from",
                                          str(teacher["checkpoint"]), *ACCUMULATED))
    return out, result


@pytest.mark.slow
def test_distillation_with_accumulated_micro_batches_trains_the_student_towards_its_teacher(accumulated_run):
    out, result = accumulated_run
    history = result["history"]["train"]
    assert [e["step"] for e in history] == [1, 2, 3]
    assert history[-1]["distillation"] < history[0]["distillation"] - 0.05
    for e in history:
        assert e["loss"] == pytest.approx(0.5 * e["contrastive"] + 0.5 * e["distillation"], rel=1e-5)
    log = (out / "logs/whole/train.log").read_text()
    assert "distilling from" in log and "learned 128 -> 96 map" in log


def test_tensorboard_and_the_training_curves_show_the_two_terms_apart(accumulated_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import visualization
    out, _ = accumulated_run
    tags = EventAccumulator(str(out / "logs/whole")).Reload().Tags()["scalars"]
    assert {"train/loss", "train/contrastive", "train/distillation"} <= set(tags)
    results = json.loads((out / "results/whole/training_results.json").read_text())
    loss_panel = visualization.plot_training_curves(results).axes[0]
    assert {"contrastive term", "distillation term"} <= {line.get_label() for line in loss_panel.get_lines()}


def tensor_shapes(value):
    """The shapes of every tensor anywhere inside a checkpoint's dicts and lists."""
    if torch.is_tensor(value):
        return [tuple(value.shape)]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else []
    return [shape for item in items for shape in tensor_shapes(item)]


def test_the_teacher_is_never_in_a_checkpoint_and_the_map_only_in_last(accumulated_run, teacher):
    out, _ = accumulated_run
    student_keys = set(cm.build_model("tiny-vit-64").model.state_dict())
    teacher_embedding = tuple(teacher["setup"].model.token_embedding.weight.shape)     # (49408, 96)
    for name in ("last.pt", "best.pt"):
        checkpoint = cm.load_checkpoint(out / "ckpt/whole" / name)
        assert set(checkpoint["state_dict"]) == student_keys, name
        assert checkpoint["model_config"]["embed_dim"] == 128, name
        assert teacher_embedding not in tensor_shapes(checkpoint), name      # nowhere, optimiser included
    assert list(cm.load_checkpoint(out / "ckpt/whole/last.pt")["distillation"]) == ["map"]
    assert "distillation" not in cm.load_checkpoint(out / "ckpt/whole/best.pt")


@pytest.mark.slow
def test_a_resumed_distilled_run_ends_where_an_uninterrupted_one_does(accumulated_run, data, teacher, tmp_path):
    out, _ = accumulated_run
    flags = ("--run_name", "split", "--distill_from", str(teacher["checkpoint"]), *ACCUMULATED)
    single_thread_main(run_flags(data, tmp_path, *flags, "--stop_at_step", "2"))
    single_thread_main(run_flags(data, tmp_path, *flags, "--resume", "auto"))
    whole = cm.load_checkpoint(out / "ckpt/whole/last.pt")
    split_run = cm.load_checkpoint(tmp_path / "ckpt/split/last.pt")
    for name, tensor in whole["state_dict"].items():
        assert torch.equal(tensor, split_run["state_dict"][name]), name
    assert torch.equal(whole["distillation"]["map"], split_run["distillation"]["map"])
    with pytest.raises(SettingsError, match="feature map"):   # resumed without the map it trained
        single_thread_main(run_flags(data, tmp_path, "--run_name", "split", "--resume", "auto", "--max_steps", "4",
                                     "--distill_from", str(teacher["checkpoint"]), "--no-distill_features"))


@pytest.mark.slow
def test_the_cached_teacher_gives_the_live_teachers_loss(data, teacher, tmp_path):
    flags = ("--distill_from", str(teacher["folder"]), "--no-augment", "--max_steps", "2")
    live = single_thread_main(run_flags(data, tmp_path, "--run_name", "live", *flags))
    cached = single_thread_main(run_flags(data, tmp_path, "--run_name", "cached", "--distill_cache", *flags))
    for a, b in zip(live["history"]["train"], cached["history"]["train"]):
        assert b["distillation"] == pytest.approx(a["distillation"], rel=1e-4)
        assert b["contrastive"] == pytest.approx(a["contrastive"], rel=1e-4)
    assert "distill_cache: the teacher's features of 180 images" in (tmp_path / "logs/cached/train.log").read_text()


@pytest.mark.slow
def test_torchrun_distils_on_two_processes_as_one_process_does_on_the_same_global_batch(accumulated_run, data,
                                                                                       teacher, tmp_path):
    out, single = accumulated_run
    flags = run_flags(data, tmp_path, "--run_name", "dist", "--distill_from", str(teacher["checkpoint"]),
                      *ACCUMULATED, batch_size=8)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "train.py"), *flags], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = (tmp_path / "logs/dist/train.log").read_text()
    assert "2 process(es)" in log and "global batch of 32" in log
    one = cm.load_checkpoint(out / "ckpt/whole/last.pt")
    two = cm.load_checkpoint(tmp_path / "ckpt/dist/last.pt")
    assert [e["distillation"] for e in two["history"]["train"]] == \
        pytest.approx([e["distillation"] for e in single["history"]["train"]], rel=1e-4)
    # the same samples, teacher, loss and updates; only the order of float additions differs
    for name, tensor in two["state_dict"].items():
        torch.testing.assert_close(one["state_dict"][name], tensor, rtol=1e-5, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")
    torch.testing.assert_close(one["distillation"]["map"], two["distillation"]["map"], rtol=1e-5, atol=1e-5)
