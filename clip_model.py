"""The CLIP model, its contrastive loss, and the checkpoint format.

CLIP in one paragraph. An image tower f and a text tower g map an image and a caption into the
same D-dimensional space. Both outputs are L2-normalised, so the dot product of an image vector
x_i and a text vector y_j is their cosine similarity, a number in [-1, 1]. Training pulls each
image towards its own caption and pushes it away from every other caption in the batch (and vice
versa) with a softmax over similarities, sharpened by a learned temperature. After training, any
text can be compared with any image: retrieval is a nearest-neighbour search, and zero-shot
classification is retrieval among captions made from class names ("a photo of a {class}").

The towers come from open_clip, so every open_clip architecture and pretrained tag works here;
`model_configs/` adds small presets of our own for CPUs and small GPUs.
"""
import contextlib
import hashlib
import json
import logging
import math
import os
import random
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import open_clip
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

PRESET_DIR = Path(__file__).resolve().parent / "model_configs"
open_clip.add_model_config(PRESET_DIR)
PRESETS = sorted(p.stem for p in PRESET_DIR.glob("*.json"))

# CLIP initialises the temperature at 0.07, i.e. logit scale 1/0.07, and stores its log so that the
# optimiser works on an unconstrained number. It is clamped at 100: beyond that the softmax becomes
# nearly one-hot and training turns unstable (CLIP paper, section 2.5).
INIT_LOGIT_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = math.log(100)
# SigLIP starts from a scale of 10 and a bias of -10, so that at initialisation every pair looks
# like a negative: the right prior when only 1 in B pairs is positive (Zhai et al. 2023, sec. 3.2).
SIGLIP_INIT_LOGIT_SCALE = math.log(10)
SIGLIP_INIT_LOGIT_BIAS = -10.0

# The last linear map of each tower into the shared space, across open_clip's tower types
# (ViT, timm trunk, ModifiedResNet, text transformer, Hugging Face text model).
PROJECTION_PARAMETERS = ("visual.proj", "visual.head.proj", "visual.attnpool.c_proj",
                         "text_projection", "text.text_projection", "text.proj")
TEMPERATURE_PARAMETERS = ("logit_scale", "logit_bias")

CHECKPOINT_FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint file that is missing, truncated or not ours."""


class ModelError(ValueError):
    """A model name, config file or pretrained tag that does not exist."""


class PretrainedUnavailable(RuntimeError):
    """Pretrained weights that cannot be downloaded here."""


@dataclass
class ClipSetup:
    """A model with everything needed to feed it and to rebuild it."""
    model: nn.Module
    tokenizer: object        # open_clip tokenizer: list[str] -> LongTensor[N, context_length]
    preprocess_cfg: dict     # image size, mean, std, interpolation, resize mode
    model_name: str
    model_config: dict       # the full open_clip config: rebuilds the architecture on its own


# ----------------------------------------------------------------------------------------------
# Building models

def resolve_model_name(model_name):
    """Accept an open_clip name, one of our presets, or the path of an open_clip config JSON."""
    if model_name.endswith(".json"):
        path = Path(model_name)
        if not path.is_file():
            raise ModelError(f"--model_name {model_name}: config file not found")
        open_clip.add_model_config(path)
        model_name = path.stem
    if open_clip.get_model_config(model_name) is None:
        raise ModelError(f"--model_name {model_name!r} is not an open_clip model, a preset "
                         f"({', '.join(PRESETS)}) or a config .json file. "
                         f"Known names: python -c 'import open_clip; print(open_clip.list_models())'")
    return model_name


def register_model_config(model_name, model_config):
    """Make a config known to open_clip (for checkpoints of custom architectures) and return the
    name it is known by: model_name itself, or model_name plus a hash of the config when
    open_clip knows a different config by that name (a preset trained with another context length)."""
    known = open_clip.get_model_config(model_name)
    if known == model_config:
        return model_name
    if known is not None:
        digest = hashlib.sha1(json.dumps(model_config, sort_keys=True).encode()).hexdigest()[:8]
        model_name = f"{model_name}-{digest}"
    folder = Path(tempfile.mkdtemp(prefix="clip_configs_"))
    (folder / f"{model_name}.json").write_text(json.dumps(model_config))
    open_clip.add_model_config(folder / f"{model_name}.json")
    return model_name


def _host_reachable(url, timeout=3.0):
    host = urlparse(url).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _cached_hf_file(hf_hub_entry):
    """The local copy of a Hugging Face hub file ('org/repo/' or 'org/repo/file'), if cached."""
    from huggingface_hub import try_to_load_from_cache
    repo_id, filename = os.path.split(hf_hub_entry)
    for name in [filename] if filename else ["open_clip_model.safetensors",
                                             "open_clip_pytorch_model.bin"]:
        path = try_to_load_from_cache(repo_id, name)
        if isinstance(path, str):
            return path
    return None


def resolve_pretrained(model_name, pretrained):
    """Turn a pretrained tag into a local weights file, downloading it if needed.

    Returns (path, tag_config). open_clip's own downloader retries for a minute when the hub is
    unreachable; we probe the host first so that an offline machine gets a clear answer at once.
    """
    if not pretrained or pretrained == "none":
        return None, {}
    if os.path.isfile(pretrained):
        return pretrained, {}
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise ModelError(f"--pretrained {pretrained!r}: neither a file nor a pretrained tag of "
                         f"{model_name} (tags: {', '.join(tags) or 'none'})")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = f"{endpoint}/{tag_cfg['hf_hub']}" if tag_cfg.get("hf_hub") else tag_cfg.get("url", "")
    cached = _cached_hf_file(tag_cfg["hf_hub"]) if tag_cfg.get("hf_hub") else None
    if cached:
        return cached, tag_cfg
    if not _host_reachable(url):
        raise PretrainedUnavailable(
            f"--pretrained {pretrained}: the weights of {model_name}/{pretrained} must be downloaded "
            f"from {urlparse(url).hostname}, which cannot be reached from this machine. Download them "
            f"where there is a network (python -c \"import open_clip; open_clip.create_model("
            f"'{model_name}', pretrained='{pretrained}')\" fills the Hugging Face cache), or copy "
            f"the weights file here and pass its path: --pretrained /path/to/open_clip_model.safetensors")
    return open_clip.download_pretrained(tag_cfg), tag_cfg


@contextlib.contextmanager
def _quiet_open_clip():
    # open_clip logs a warning for every randomly initialised model; that is our normal case.
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def build_model(model_name, pretrained="", device="cpu", loss="clip", patch_dropout=0.0,
                grad_checkpointing=False, context_length=0, model_config=None):
    """Create a CLIP model (and its tokenizer and image preprocessing) from open_clip.

    model_config rebuilds an architecture stored in a checkpoint, even one that open_clip does
    not know by name. With loss="siglip" the model gets SigLIP's learned bias and initial scale.
    context_length > 0 changes how many tokens the text tower reads (longer captions, or
    Chinese, which the byte-level BPE splits into about 3 tokens per character).
    """
    if model_config is not None:
        model_name = register_model_config(model_name, model_config)
    else:
        model_name = resolve_model_name(model_name)
    weights, tag_cfg = resolve_pretrained(model_name, pretrained)
    options = {}
    if loss == "siglip":
        options.update(init_logit_scale=SIGLIP_INIT_LOGIT_SCALE, init_logit_bias=SIGLIP_INIT_LOGIT_BIAS)
    if patch_dropout:
        options["force_patch_dropout"] = patch_dropout
    if context_length:
        options["force_context_length"] = context_length
    # A tag may need settings the bare config lacks (OpenAI weights use QuickGELU, some tags
    # normalise images with their own mean and std).
    preprocess_keys = ("mean", "std", "interpolation", "resize_mode")
    forced_preprocess = {k: tag_cfg[k] for k in preprocess_keys if k in tag_cfg}
    with _quiet_open_clip():
        model = open_clip.create_model(
            model_name, pretrained=weights, device=device, output_dict=True,
            force_quick_gelu=tag_cfg.get("quick_gelu", False),
            force_preprocess_cfg=forced_preprocess or None, **options)
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    config = open_clip.get_model_config(model_name)
    if tag_cfg.get("quick_gelu"):   # the activation is part of the architecture a checkpoint rebuilds
        config["quick_gelu"] = True
    if context_length:
        config["text_cfg"]["context_length"] = context_length
    return ClipSetup(model=model, preprocess_cfg=dict(model.visual.preprocess_cfg),
                     tokenizer=open_clip.get_tokenizer(model_name, context_length=context_length or None),
                     model_name=model_name, model_config=config)


def count_parameters(model, trainable_only=False):
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ----------------------------------------------------------------------------------------------
# Fine-tuning controls

def _matches(name, prefixes):
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def freeze_for_finetuning(model, freeze_backbone=False, lock_image=-1, lock_text=-1):
    """Choose which parameters train.

    freeze_backbone: only the two projections into the shared space and the temperature train,
        a linear probe of both towers at once (cheap, and hard to overfit on small data).
    lock_image / lock_text = N >= 0: lock the tower except its last N layer groups (LiT:
        "Locked-image Tuning", Zhai et al. 2022); -1 leaves the tower trainable.
    A frozen ResNet tower also freezes its BatchNorm statistics: updating running means with a
    frozen trunk would silently change the features the projection was trained on.
    """
    if freeze_backbone:
        model.lock_image_tower(unlocked_groups=0, freeze_bn_stats=True)
        for name, param in model.named_parameters():
            param.requires_grad = _matches(name, PROJECTION_PARAMETERS + TEMPERATURE_PARAMETERS)
        return
    if lock_image >= 0:
        model.lock_image_tower(unlocked_groups=lock_image, freeze_bn_stats=True)
    if lock_text >= 0:
        model.lock_text_tower(unlocked_layers=lock_text)


def clamp_logit_scale(model):
    """Keep the learned temperature inside [1, 100] after each optimiser step."""
    with torch.no_grad():
        model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)


# ----------------------------------------------------------------------------------------------
# Encoding

def autocast(device, precision):
    """Mixed precision: fp16 with loss scaling on CUDA ("amp"), bfloat16 on CUDA or CPU ("bf16")."""
    device_type = torch.device(device).type
    if precision == "amp":
        return torch.autocast(device_type, dtype=torch.float16)
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.inference_mode()
def encode_images(model, loader, device, precision="fp32"):
    """L2-normalised features of every image a loader of (images, indices) batches yields."""
    model.eval()
    features = []
    for images, _ in loader:
        with autocast(device, precision):
            features.append(model.encode_image(images.to(device), normalize=True).float().cpu())
    return torch.cat(features)


@torch.inference_mode()
def encode_texts(model, tokenizer, texts, device, batch_size=256, precision="fp32"):
    """L2-normalised features of a list of texts, encoded batch_size at a time."""
    model.eval()
    features = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[start:start + batch_size])).to(device)
        with autocast(device, precision):
            features.append(model.encode_text(tokens, normalize=True).float().cpu())
    return torch.cat(features)


# ----------------------------------------------------------------------------------------------
# Losses

def world_info():
    """(rank, world size); a single process is rank 0 of a world of one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_features(features):
    """Concatenate a tensor from every process along dim 0, keeping the gradient.

    torch.distributed.nn.functional.all_gather sends gradients back to the process that owns
    each slice, so every process learns from negatives of the whole global batch.
    """
    rank, world_size = world_info()
    if world_size == 1:
        return features
    from torch.distributed.nn.functional import all_gather
    return torch.cat(all_gather(features))


def gather_ids(ids):
    """Concatenate integer ids from every process (no gradient needed)."""
    rank, world_size = world_info()
    if world_size == 1:
        return ids
    parts = [torch.empty_like(ids) for _ in range(world_size)]
    dist.all_gather(parts, ids)
    return torch.cat(parts)


def _global_batch(image_features, text_features, image_ids, local_loss):
    """Rows (this process's items, or all when not local) and columns (all items) of the logits."""
    all_images, all_texts = gather_features(image_features), gather_features(text_features)
    all_ids = gather_ids(image_ids)
    if local_loss:
        return image_features, text_features, image_ids, all_images, all_texts, all_ids
    return all_images, all_texts, all_ids, all_images, all_texts, all_ids


class ContrastiveLoss(nn.Module):
    r"""Symmetric InfoNCE, the loss of CLIP.

    With normalised image features x_i, text features y_j and logit scale s = exp(t) (t learned):

        L_ij   = s * x_i . y_j                                   (B x B logits)
        loss_I = -1/B sum_i log( sum_{j in P(i)} exp(L_ij) / sum_j exp(L_ij) )   image -> text
        loss_T = -1/B sum_j log( sum_{i in P(j)} exp(L_ij) / sum_i exp(L_ij) )   text -> image
        loss   = (loss_I + loss_T) / 2

    P(i) are the positives of row i: the texts of the same image. With one caption per image P(i)
    is {i} and each direction is the cross-entropy with targets 0..B-1 of the CLIP paper. When one
    image appears twice in a batch (two of its captions), targets come from image identity, so the
    two copies are not pushed apart as if they were negatives of each other.

    Across processes the features are gathered with gradient, so the B above is the global batch.
    local_loss=True keeps only this process's rows (B_local x B_global logits instead of
    B_global^2): the same gradient on average at a fraction of the memory.
    """

    def __init__(self, local_loss=False):
        super().__init__()
        self.local_loss = local_loss

    def forward(self, image_features, text_features, logit_scale, image_ids, logit_bias=None):
        x_rows, y_rows, id_rows, x_all, y_all, id_all = _global_batch(
            image_features, text_features, image_ids, self.local_loss)
        logits_image_text = logit_scale * x_rows @ y_all.T       # rows: images, columns: texts
        logits_text_image = logit_scale * y_rows @ x_all.T       # rows: texts, columns: images
        positives = id_rows[:, None] == id_all[None, :]
        return (_multi_positive_nll(logits_image_text, positives)
                + _multi_positive_nll(logits_text_image, positives)) / 2


def _multi_positive_nll(logits, positives):
    """-mean_i log( sum_{j in P(i)} softmax(logits_i)_j ), computed stably with logsumexp."""
    positive_logits = logits.masked_fill(~positives, float("-inf"))
    return (torch.logsumexp(logits, dim=1) - torch.logsumexp(positive_logits, dim=1)).mean()


class SigLipLoss(nn.Module):
    r"""Sigmoid loss of SigLIP (Zhai et al. 2023): every image-text pair is its own binary
    classification, so no softmax over the batch is needed.

        L_ij = s * x_i . y_j + b,    z_ij = +1 if text j belongs to image i else -1
        loss = -1/B sum_i sum_j log sigmoid(z_ij * L_ij)

    with learned scale s = exp(t) and bias b. Rows are this process's images, columns the texts
    of the global batch (gathered with gradient), so every process sums its share of pairs.
    """

    def forward(self, image_features, text_features, logit_scale, image_ids, logit_bias=None):
        all_texts, all_ids = gather_features(text_features), gather_ids(image_ids)
        logits = logit_scale * image_features @ all_texts.T + logit_bias
        signs = torch.where(image_ids[:, None] == all_ids[None, :], 1.0, -1.0)
        # Each process divides by its local B; averaging the gradient over processes (as DDP
        # does) then gives -1/B_global sum over all pairs.
        return -F.logsigmoid(signs * logits).sum() / image_features.shape[0]


def create_loss(name, local_loss=False):
    if name == "clip":
        return ContrastiveLoss(local_loss=local_loss)
    if name == "siglip":
        return SigLipLoss()
    raise ValueError(f"loss {name!r}: expected 'clip' or 'siglip'")


# ----------------------------------------------------------------------------------------------
# Checkpoints

def unwrap(model):
    """The bare model inside DistributedDataParallel and torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def rng_state():
    """Every random generator's state, as tensors and lists so that weights_only loading works."""
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)),
                  *numpy_state[2:]],
        "python": [python_state[0], list(python_state[1]), python_state[2]],
    }


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(path, setup, **training_state):
    """Write a checkpoint atomically: a temporary file in the same folder, then a rename.

    A run killed mid-save leaves the temporary file behind and the previous checkpoint intact,
    because os.replace is atomic on POSIX and Windows. The weights sit under "state_dict", the key
    open_clip reads, so open_clip.create_model(name, pretrained=path) loads our checkpoints.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": CHECKPOINT_FORMAT, "state_dict": unwrap(setup.model).state_dict(),
               "model_name": setup.model_name, "model_config": setup.model_config,
               "preprocess_cfg": {k: list(v) if isinstance(v, tuple) else v
                                  for k, v in setup.preprocess_cfg.items()},
               **training_state}
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path):
    """Read a checkpoint safely: weights_only=True can never run code hidden in the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a damaged zip archive
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(error).__name__}: {error}). The file is "
            f"truncated or corrupt, e.g. copied while it was being written; use another "
            f"checkpoint of the run (last.pt / best.pt)") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"checkpoint {path} has no 'state_dict': not a model checkpoint")
    return checkpoint


def model_from_checkpoint(path, device="cpu"):
    """Rebuild a model from one of our checkpoints alone. Returns (ClipSetup, checkpoint)."""
    checkpoint = load_checkpoint(path)
    if "model_config" not in checkpoint:
        raise CheckpointError(f"checkpoint {path} has weights but no model config; load it with "
                              f"--model_name NAME --pretrained {path} instead")
    loss = "siglip" if "logit_bias" in checkpoint["state_dict"] else "clip"
    setup = build_model(checkpoint["model_name"], device=device, loss=loss,
                        model_config=checkpoint["model_config"])
    setup.model.load_state_dict(checkpoint["state_dict"])
    if "preprocess_cfg" in checkpoint:   # a pretrained tag's own mean and std stay with its weights
        setup.preprocess_cfg = {**setup.preprocess_cfg, **checkpoint["preprocess_cfg"]}
        open_clip.set_model_preprocess_cfg(setup.model, setup.preprocess_cfg)
    return setup, checkpoint
