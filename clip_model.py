"""The CLIP model, its contrastive loss, and the checkpoint format.

CLIP in one paragraph. An image tower f and a text tower g map an image and a caption into the
same D-dimensional space. Both outputs are L2-normalised, so the dot product of an image vector
x_i and a text vector y_j is their cosine similarity, a number in [-1, 1]. Training pulls each
image towards its own caption and pushes it away from every other caption in the batch (and vice
versa) with a softmax over similarities, sharpened by a learned temperature. After training, any
text can be compared with any image: retrieval is a nearest-neighbour search, and zero-shot
classification is retrieval among captions made from class names ("a photo of a {class}").

The towers come from open_clip, so every open_clip architecture and pretrained tag works here;
`model_configs/` adds small presets of our own for CPUs and small GPUs. A CoCa is a CLIP with a
third tower, a text decoder that writes captions: its loss beside the contrastive one is
`CaptionLoss`, its captions come from `generate_captions`.
"""
import contextlib
import dataclasses
import json
import logging
import math
import os
import pickle
import random
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import open_clip
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import try_to_load_from_cache
from safetensors.torch import load_file
from torch.distributed.nn.functional import all_gather

import chinese_clip
import files
from errors import (
    CheckpointError,
    ModelError,
    OutputError,
    PretrainedUnavailable,
    SettingsError,
    UserError,
    disk_full_message,
    short_repr,
)
from settings import in_range

PRESET_DIR = Path(__file__).resolve().parent / "model_configs"
open_clip.add_model_config(PRESET_DIR)
PRESETS = sorted(p.stem for p in PRESET_DIR.glob("*.json"))

# CLIP initialises the temperature at 0.07, i.e. logit scale 1/0.07, and stores its log so that the
# optimiser works on an unconstrained number. It is clamped at 100: beyond that the softmax becomes
# nearly one-hot and training turns unstable (CLIP paper, section 2.5).
LOG_INIT_LOGIT_SCALE = math.log(1 / 0.07)
LOG_MAX_LOGIT_SCALE = math.log(100)
# SigLIP starts from a scale of 10 and a bias of -10, so that at initialisation every pair looks
# like a negative: the right prior when only 1 in B pairs is positive (Zhai et al. 2023, sec. 3.2).
SIGLIP_LOG_INIT_LOGIT_SCALE = math.log(10)
SIGLIP_INIT_LOGIT_BIAS = -10.0

# The last linear map of each tower into the shared space, across open_clip's tower types
# (ViT, timm trunk, ModifiedResNet, text transformer, Hugging Face text model).
PROJECTION_PARAMETERS = ("visual.proj", "visual.head.proj", "visual.attnpool.c_proj",
                         "text_projection", "text.text_projection", "text.proj")
TEMPERATURE_PARAMETERS = ("logit_scale", "logit_bias")
# A captioner's text decoder (CoCa): a third tower, from the image's tokens to words.
DECODER_PARAMETERS = ("text_decoder",)

# Version of the checkpoint layout written by save_checkpoint; load_checkpoint refuses newer ones.
CHECKPOINT_FORMAT = 1
# What a model config read from a file (a checkpoint, a model folder) may ask us to build. Such a
# config is data from elsewhere: embed_dim 2^40 would have open_clip allocate 512 TB, a tower of
# 10^9 layers would loop for hours before its first tensor. Real ones stay far below: widths and
# lengths in the thousands, vocabularies up to 250,002 (XLM-R), tens of layers, and 5.0 billion
# parameters for the largest open_clip model (EVA02-E-14-plus).
MAX_CONFIG_NUMBER = 2 ** 20     # any number of the model or preprocessing config
MAX_LAYERS = 1024               # the layers of one tower (summed over a ResNet's stages)
MAX_PARAMETERS = 20 * 10 ** 9
# The small files a Hugging Face text tower and tokenizer are built from, beside the weights: the
# tower's config and the tokenizer's files. open_clip reads them from the hub, its cache or the
# folder its config names; a checkpoint carries them (ClipSetup.text_files), so that it rebuilds
# without the network and without that folder. Only these names are ever written, and at most
# MAX_TEXT_FILES_BYTES in all (check_text_files).
TEXT_FILES = ("config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
MAX_TEXT_FILES_BYTES = 64 * 2 ** 20


@dataclass
class ClipSetup:
    """A model with everything needed to feed it and to rebuild it."""
    model: nn.Module
    tokenizer: object        # CaptionTokenizer: list[str] -> LongTensor[N, context_length]
    preprocess_cfg: dict     # image size, mean, std, interpolation, resize mode
    model_name: str
    model_config: dict       # the full open_clip config: rebuilds the architecture on its own
    text_files: dict = field(default_factory=dict)   # {name in TEXT_FILES: text}: a Hugging Face tower's, else {}


# ----------------------------------------------------------------------------------------------
# Devices

def pick_device(requested="auto", local_rank=0):
    """torch.device for a name: auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.
    SettingsError when the device does not exist here."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise SettingsError(f"device {requested!r}: not a device name; use auto, cpu, cuda, cuda:N "
                            f"or mps") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": torch.backends.mps.is_available()}.get(device.type, False)
    if not available or device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise SettingsError(f"device {requested!r} is not available on this machine; use auto")
    return device


def pick_precision(requested, device):
    """auto: amp (fp16 with loss scaling) on CUDA, fp32 elsewhere. amp needs CUDA."""
    if requested == "auto":
        return "amp" if device.type == "cuda" else "fp32"
    if requested == "amp" and device.type != "cuda":
        raise SettingsError(f"precision amp needs CUDA (device is {device}); use bf16 or fp32")
    return requested


# ----------------------------------------------------------------------------------------------
# Tokenising

class CaptionTokenizer:
    """open_clip's tokenizer, with each caption cut before it is tokenised.

    Byte-pair encoding takes time quadratic in the length of a word, and the tokenizer encodes
    the whole caption before keeping the first context_length tokens: one 100,000-letter caption
    without spaces took 77 s. Only the first K = context_length - 2 tokens are kept, and a token
    is at most L characters long (L = the longest token of the vocabulary, 32 for CLIP's), so the
    kept tokens come from the first K * L characters of a word. Each word (a run without
    whitespace) is therefore cut to (K + 8) * L characters: the kept tokens and eight more
    tokens' worth of the word stay, and a merge of byte pairs, which only joins neighbours,
    cannot carry the effect of the cut back over that margin (tests check random long words).
    Runs of whitespace become one space first, as the tokenizer's cleaning would do anyway.
    Tokenizers without this cost (the Rust tokenizers of Hugging Face text towers) are left as
    they are.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.context_length = tokenizer.context_length
        vocabulary = getattr(tokenizer, "encoder", None)
        if isinstance(tokenizer, open_clip.tokenizer.SimpleTokenizer) and vocabulary:
            longest = max(len(token) for token in vocabulary)
            self.max_word = (self.context_length - 2 + 8) * longest
        else:
            self.max_word = None

    def cut(self, text):
        if self.max_word is None:
            return text
        return " ".join(word[:self.max_word] for word in text.split())

    def __call__(self, texts):
        if isinstance(texts, str):
            texts = [texts]
        return self.tokenizer([self.cut(text) for text in texts])


# ----------------------------------------------------------------------------------------------
# Building models

def resolve_model_name(model_name):
    """Accept an open_clip name, one of our presets, the path of an open_clip config JSON, or a
    Chinese-CLIP name (cn-clip:ViT-B-16: chinese_clip.py)."""
    if chinese_clip.is_name(model_name):
        chinese_clip.towers(model_name)          # ModelError for a pairing it does not know
        return model_name
    if model_name.endswith(".json"):
        path = Path(model_name)
        if not path.is_file():
            raise ModelError(f"--model_name {model_name}: config file not found")
        open_clip.add_model_config(path)
        model_name = path.stem
    if open_clip.get_model_config(model_name) is None:
        raise ModelError(f"--model_name {model_name!r} is not an open_clip model, a preset "
                         f"({', '.join(PRESETS)}), a config .json file or a Chinese-CLIP model "
                         f"({chinese_clip.PREFIX}ViT-B-16, ...). "
                         f"Known names: python -c 'import open_clip; print(open_clip.list_models())'")
    return model_name


def _host_reachable(url, timeout=3.0):
    """True if an HTTP server answers at url within timeout seconds, through the proxy of
    HTTPS_PROXY / HTTP_PROXY when one is set (urllib honours them, and NO_PROXY). The opener is
    built at each call: urlopen's own is built once per process, with the proxies of that moment."""
    try:
        urllib.request.build_opener().open(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
        return True
    except urllib.error.HTTPError:     # the server answered (401, 404, ...): the host is reachable
        return True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _hub_offline():
    """HF_HUB_OFFLINE=1 (the Hugging Face convention) means: never try the network."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _cached_hf_file(hf_hub_entry):
    """The local copy of a Hugging Face hub file ('org/repo/' or 'org/repo/file'), if cached."""
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
    unreachable; we look in the cache first, respect HF_HUB_OFFLINE, and probe the host (through
    the configured proxy) so that an offline machine gets a clear answer at once. A Chinese-CLIP
    name's tags are chinese_clip's, downloaded the same way.
    """
    if not pretrained or pretrained == "none":
        return None, {}
    if os.path.isfile(pretrained):
        return pretrained, {}
    chinese = chinese_clip.is_name(model_name)
    tag_cfg = (chinese_clip.pretrained_cfg if chinese else open_clip.get_pretrained_cfg)(model_name, pretrained)
    if not tag_cfg:
        tags = (chinese_clip.pretrained_tags if chinese else open_clip.list_pretrained_tags_by_model)(model_name)
        raise ModelError(f"--pretrained {pretrained!r}: neither a file nor a pretrained tag of "
                         f"{model_name} (tags: {', '.join(tags) or 'none'})")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = f"{endpoint}/{tag_cfg['hf_hub']}" if tag_cfg.get("hf_hub") else tag_cfg.get("url", "")
    cached = _cached_hf_file(tag_cfg["hf_hub"]) if tag_cfg.get("hf_hub") else None
    if cached:
        return cached, tag_cfg
    offline = _hub_offline()
    if offline or not _host_reachable(url):
        why = "HF_HUB_OFFLINE is set" if offline else \
            f"{urlparse(url).hostname} cannot be reached from this machine"
        download = chinese_clip.download_command(tag_cfg) if chinese else \
            f"python -c \"import open_clip; open_clip.create_model('{model_name}', pretrained='{pretrained}')\""
        weights_file = os.path.basename(tag_cfg["hf_hub"]) if chinese else "open_clip_model.safetensors"
        raise PretrainedUnavailable(
            f"--pretrained {pretrained}: the weights of {model_name}/{pretrained} are not in the "
            f"cache and must be downloaded, but {why}. Download them where there is a network "
            f"({download} fills the Hugging Face cache), or copy the weights file "
            f"here and pass its path: --pretrained /path/to/{weights_file}")
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


def _model_options(loss, patch_dropout, context_length):
    options = {}
    if loss == "siglip":
        options.update(init_logit_scale=SIGLIP_LOG_INIT_LOGIT_SCALE, init_logit_bias=SIGLIP_INIT_LOGIT_BIAS)
    if patch_dropout:
        options["force_patch_dropout"] = patch_dropout
    if context_length:
        options["force_context_length"] = context_length
    return options


def _create_from_config(model_config, preprocess_cfg, options, source, text_files=None):
    """(model, tokenizer) of an architecture given as a config dict, e.g. read from a checkpoint.

    open_clip builds such a model from a folder holding open_clip_config.json ("local-dir:").
    The folder is a private temporary one, removed at once, and the file name is fixed: the
    checkpoint's model name is data, never part of a path, so no checkpoint can make us write
    anywhere else. The config is checked first (check_model_config); keys open_clip does not
    know are refused. A Hugging Face text tower is built without its pretrained weights
    (pretrained_text=False): the checkpoint's weights replace them, so fetching them from the hub
    would only cost a download, or fail offline.

    text_files, the tower's config and tokenizer files a checkpoint carries (checked by
    check_text_files), are written into the same folder under their fixed names, and the
    temporary copy of the config points hf_model_name and hf_tokenizer_name at that folder: both
    are built from the checkpoint alone (the setup's config keeps the names it was trained with).
    A checkpoint without them (written before they were carried) reads them where its config
    names them: the hub, its cache or a folder.
    """
    check_model_config(model_config, preprocess_cfg, source)
    text_files = check_text_files(text_files, source)
    elsewhere = _read_elsewhere(model_config["text_cfg"], text_files)
    way_out = (f"; the checkpoint does not carry its text tower's files and reads them from "
               f"{' and '.join(map(short_repr, elsewhere))}: load it once where that can be read (the "
               f"Hugging Face cache then keeps the hub's files)") if elsewhere else ""
    with tempfile.TemporaryDirectory(prefix="clip_config_") as folder:
        for name, text in text_files.items():       # names of TEXT_FILES only
            Path(folder, name).write_text(text, encoding="utf-8", newline="")
        with open(os.path.join(folder, "open_clip_config.json"), "w", encoding="utf-8") as f:
            json.dump({"model_cfg": _reading_text_files_from(folder, model_config, text_files),
                       "preprocess_cfg": preprocess_cfg or {}}, f)
        name = f"local-dir:{folder}"
        with _config_errors(source, "its model_config cannot be built by open_clip", way_out):
            model = _create_within_bounds(lambda device: open_clip.create_model(
                name, output_dict=True, device=device, pretrained_text=False, **options), source)
            tokenizer = _rebuilt_tokenizer(name, model_config["text_cfg"], text_files,
                                           options.get("force_context_length"))
    return model, tokenizer


def _has_tokenizer_files(text_files):
    return bool(set(text_files) - {"config.json"})


def _read_elsewhere(text_cfg, text_files):
    """The hub repositories (or folders) that a Hugging Face tower or tokenizer whose files are not
    in text_files is read from."""
    names = []
    if text_cfg.get("hf_model_name") and "config.json" not in text_files:
        names.append(str(text_cfg["hf_model_name"]))
    if text_cfg.get("hf_tokenizer_name") and not _has_tokenizer_files(text_files):
        names.append(str(text_cfg["hf_tokenizer_name"]))
    return list(dict.fromkeys(names))


def _reading_text_files_from(folder, model_config, text_files):
    """A copy of model_config whose Hugging Face tower and tokenizer are read from folder, where
    text_files are written."""
    text_cfg = dict(model_config["text_cfg"])
    if text_cfg.get("hf_model_name") and "config.json" in text_files:
        text_cfg["hf_model_name"] = folder
    if text_cfg.get("hf_tokenizer_name") and _has_tokenizer_files(text_files):
        text_cfg["hf_tokenizer_name"] = folder
    return {**model_config, "text_cfg": text_cfg}


def _rebuilt_tokenizer(name, text_cfg, text_files, context_length):
    """The tokenizer of the model built from `name` ("local-dir:FOLDER"). open_clip reads the
    Hugging Face tokenizer of such a model from the folder, where the tokenizer's files are; a
    checkpoint that does not carry them gets it from its config's hf_tokenizer_name, as open_clip
    does for a model it knows by name."""
    if text_cfg.get("hf_tokenizer_name") and not _has_tokenizer_files(text_files):
        return open_clip.tokenizer.HFTokenizer(
            text_cfg["hf_tokenizer_name"], tokenizer_mode=text_cfg.get("tokenizer_mode"),
            context_length=context_length or text_cfg.get("context_length", open_clip.tokenizer.DEFAULT_CONTEXT_LENGTH),
            **text_cfg.get("tokenizer_kwargs", {}))
    return open_clip.get_tokenizer(name, context_length=context_length)


def _text_files_of(model, tokenizer):
    """{name: text} of TEXT_FILES for a model whose text tower or tokenizer is a Hugging Face one,
    read back from what open_clip loaded (from the hub, its cache or a folder): the tower's config
    as transformers writes it, and the files the tokenizer saves. {} for other models."""
    found = {}
    if isinstance(tokenizer, open_clip.tokenizer.HFTokenizer):
        with tempfile.TemporaryDirectory(prefix="clip_text_files_") as folder:
            tokenizer.save_pretrained(folder)
            for name in TEXT_FILES:
                path = Path(folder, name)
                if path.is_file():
                    with open(path, encoding="utf-8", newline="") as f:
                        found[name] = f.read()
    text = getattr(model, "text", None)
    if isinstance(text, open_clip.hf_model.HFTextEncoder):
        found["config.json"] = text.config.to_json_string()
    return found


def build_model(model_name, pretrained="", device="cpu", loss="clip", patch_dropout=0.0,
                grad_checkpointing=False, context_length=0, model_config=None, preprocess_cfg=None,
                text_files=None):
    """Create a CLIP model (and its tokenizer and image preprocessing) from open_clip.

    model_config (with its preprocess_cfg and text_files) rebuilds an architecture stored in a
    checkpoint, even one that open_clip does not know by name; pretrained is then ignored (the
    weights come from the checkpoint). A model with a Hugging Face text tower or tokenizer keeps
    their files in the setup (text_files: the checkpoint's, or read back from what open_clip
    loaded), so that its checkpoints rebuild from themselves. A Chinese-CLIP name (cn-clip:ViT-B-16)
    is built from chinese_clip.architecture's config, and pretrained is a file of its weights, ours
    or as Chinese-CLIP releases them, or its tag chinese-clip. With loss="siglip" the model gets
    SigLIP's learned bias and initial scale. context_length > 0 changes how many tokens the text
    tower reads (longer captions, or Chinese, which the byte-level BPE splits into about 3 tokens
    per character).
    """
    options = _model_options(loss, patch_dropout, context_length)
    weights = None                       # with a checkpoint's model_config: its own, which the caller loads
    if model_config is None and chinese_clip.is_name(model_name):
        # open_clip knows neither the name nor the layout of its released weights: the architecture
        # is built as a checkpoint's is, and its weights are read here (read_weights converts them)
        model_config, preprocess_cfg, text_files = chinese_clip.architecture(model_name)
        weights = resolve_pretrained(model_name, pretrained)[0]
    if model_config is not None:
        model, tokenizer = _create_from_config(model_config, preprocess_cfg, options, model_name, text_files)
        config = json.loads(json.dumps(model_config))
        if weights:
            load_weights(model, read_weights(weights)[0], f"--pretrained {weights}", model_name)
    else:
        model_name = resolve_model_name(model_name)
        weights, tag_cfg = resolve_pretrained(model_name, pretrained)
        # A tag may need settings the bare config lacks (OpenAI weights use QuickGELU, some tags
        # normalise images with their own mean and std).
        preprocess_keys = ("mean", "std", "interpolation", "resize_mode")
        forced_preprocess = {k: tag_cfg[k] for k in preprocess_keys if k in tag_cfg}
        with _quiet_open_clip(), _readable_weights_errors(weights, model_name, options):
            model = open_clip.create_model(
                model_name, pretrained=weights, output_dict=True,
                force_quick_gelu=tag_cfg.get("quick_gelu", False),
                force_preprocess_cfg=forced_preprocess or None, **options)
        tokenizer = open_clip.get_tokenizer(model_name, context_length=context_length or None)
        config = open_clip.get_model_config(model_name)
        if tag_cfg.get("quick_gelu"):
            config["quick_gelu"] = True
    if chinese_clip.is_name(model_name):          # a checkpoint's too: Chinese-CLIP's tokens
        chinese_clip.tokenize_raw_text(tokenizer)
    if is_captioner(model) and weights is None:     # random weights, which open_clip half-makes there
        init_text_decoder(model.text_decoder)
    if context_length:
        config["text_cfg"]["context_length"] = context_length
        # CoCa's decoder reads the caption but its last token, through a causal mask of its own size
        if is_captioner(model) and context_length - 1 > model.text_decoder.context_length:
            raise SettingsError(f"--context_length {context_length}: the text decoder of {model_name} reads "
                                f"at most {model.text_decoder.context_length + 1} tokens "
                                f"(multimodal_cfg.context_length + 1)")
    model.to(device)
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    return ClipSetup(model=model, preprocess_cfg=dict(model.visual.preprocess_cfg),
                     tokenizer=CaptionTokenizer(tokenizer), model_name=model_name, model_config=config,
                     text_files=dict(text_files or {}) or _text_files_of(model, tokenizer))


def init_text_decoder(decoder):
    """Initialise a CoCa's text decoder as CLIP initialises its text tower (OpenAI's scheme: the
    std of each matrix shrinks with the width, and with the depth for the matrices that write
    into the residual stream).

    open_clip builds the decoder without this: its init_parameters is never called, so its
    projection to the vocabulary is torch.empty, whatever the memory held. Zeros, most often:
    then every logit is 0 and no gradient reaches anything behind the projection (the decoder's
    blocks, the image's tokens) until the projection has grown, and a tiny CoCa spent its first
    hundred steps writing "a a a a". Other memory makes two runs of one seed differ.
    """
    width, layers = decoder.width, decoder.layers
    attn_std, fc_std, proj_std = width ** -0.5, (2 * width) ** -0.5, width ** -0.5 * (2 * layers) ** -0.5
    with torch.no_grad():
        for block in [*decoder.resblocks, *decoder.cross_attn]:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(decoder.text_projection, std=width ** -0.5)


@contextlib.contextmanager
def _readable_weights_errors(path, model_name, options):
    """Turn open_clip's errors while loading a weights file into one CheckpointError line."""
    try:
        yield
    except Exception as error:
        if path is None or isinstance(error, UserError):
            raise
        if _refused_by_weights_only(error):
            raise CheckpointError(_unsafe_file_message(path)) from None
        state, stored_name = read_weights(path)      # CheckpointError if the file itself is bad
        with _quiet_open_clip():
            expected = open_clip.create_model(model_name, **options).state_dict()
        raise CheckpointError(f"--pretrained {path}: " + state_dict_difference(
            state, expected, stored_name, model_name)) from None


def read_weights(path):
    """(state_dict, model name or None) of a weights file: safetensors, a state_dict, or a
    checkpoint holding one under "state_dict" (ours, with its model name; Chinese-CLIP's, whose
    layout becomes open_clip's: chinese_clip.open_clip_layout). CheckpointError naming
    the file when it is unsafe, truncated, not a weights file, or holds anything but tensors."""
    try:
        if str(path).endswith(".safetensors"):
            stored = load_file(path)
        else:
            stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch and safetensors raise many types for a damaged file
        if _refused_by_weights_only(error):
            raise CheckpointError(_unsafe_file_message(path)) from None
        raise CheckpointError(f"{path} cannot be read ({_first_line(error)}); the file is truncated "
                              f"or not a weights file") from None
    nested = isinstance(stored, dict) and "state_dict" in stored
    state = check_state_dict(stored["state_dict"] if nested else stored, path)
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    state = chinese_clip.open_clip_layout(state)    # a Chinese-CLIP release's; others unchanged
    name = stored.get("model_name") if nested else None
    if name is not None:              # shown in messages: a name of ours, or a short view of data
        name = name[:100] if isinstance(name, str) else short_repr(name)
    return state, name


def state_dict_difference(state, expected, stored_name, model_name):
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    first = (f"'{reshaped[0]}' is {list(state[reshaped[0]].shape)} in the file and "
             f"{list(expected[reshaped[0]].shape)} in the model" if reshaped else
             f"'{(missing or unexpected)[0]}' is {'missing' if missing else 'unexpected'}"
             if missing or unexpected else "the weights could not be loaded")
    holds = f"a {stored_name} model" if stored_name else "weights of another architecture"
    return (f"holds {holds}, not {model_name}: {len(missing)} tensors missing, {len(unexpected)} "
            f"unexpected, {len(reshaped)} of another shape ({first}). Use the --model_name it was "
            f"trained with (and its --context_length), or other weights")


def count_parameters(model, trainable_only=False):
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ----------------------------------------------------------------------------------------------
# Fine-tuning controls

def _matches(name, prefixes):
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def freeze_for_finetuning(model, freeze_backbone=False, lock_image=-1, lock_text=-1, lock_decoder=False):
    """Choose which parameters train.

    freeze_backbone: only the two projections into the shared space and the temperature train,
        a linear probe of both towers at once (cheap, and hard to overfit on small data).
    lock_image / lock_text = N: the tower trains only its last N blocks (transformer blocks; the
        stages of a timm ResNet) and what follows them (the final norm, the pooling and the
        projection into the shared space). N = 0 freezes the whole tower, as LiT does with the
        image tower ("Locked-image Tuning", Zhai et al. 2022); -1 leaves it trainable.
    A frozen ResNet tower also freezes its BatchNorm statistics: updating running means with a
    frozen trunk would silently change the features the projection was trained on.

    A captioner's text decoder (CoCa) is a third tower, the head that turns an image into words
    as the projections are the heads into the shared space: freeze_backbone and the lock flags
    leave it trainable (a captioner fine-tuned on a locked image tower is LiT's idea applied to
    captions). lock_decoder freezes it.
    """
    if freeze_backbone:
        # visual.lock is what CLIP.lock_image_tower calls; CoCa has no lock_image_tower
        model.visual.lock(unlocked_groups=0, freeze_bn_stats=True)
        for name, param in model.named_parameters():
            param.requires_grad = _matches(name, PROJECTION_PARAMETERS + TEMPERATURE_PARAMETERS + DECODER_PARAMETERS)
    else:
        if lock_image >= 0:
            _lock_image_tower(model, lock_image)
        if lock_text >= 0:
            _lock_text_tower(model, lock_text)
    if lock_decoder:
        for param in model.text_decoder.parameters():
            param.requires_grad = False


def _lock_image_tower(model, keep):
    # open_clip counts "groups": for a ViT the projection is a group of its own after the last
    # block, for a timm trunk the head is never locked; we count blocks in both.
    visual = model.visual
    if keep == 0:
        visual.lock(unlocked_groups=0, freeze_bn_stats=True)
        for param in visual.parameters():
            param.requires_grad = False
    elif isinstance(visual, open_clip.timm_model.TimmModel):
        visual.lock(unlocked_groups=keep, freeze_bn_stats=True)
    elif hasattr(visual, "transformer"):
        visual.lock(unlocked_groups=keep + 1, freeze_bn_stats=True)
    else:
        raise SettingsError(f"lock_image {keep}: the {type(visual).__name__} image tower can only be "
                            f"locked whole (lock_image 0) or left trainable (-1)")


def _lock_text_tower(model, keep):
    if keep == 0:
        for name, param in model.named_parameters():
            if not name.startswith("visual.") and not _matches(name, TEMPERATURE_PARAMETERS + DECODER_PARAMETERS):
                param.requires_grad = False
    elif isinstance(getattr(model, "text", None), open_clip.hf_model.HFTextEncoder):
        _lock_hf_text_tower(model, keep)
    elif is_captioner(model):
        model.text.lock(unlocked_layers=keep + 1)      # what lock_text_tower calls; CoCa has none
    else:
        model.lock_text_tower(unlocked_layers=keep + 1)  # + the projection, its own "layer" there


def _lock_hf_text_tower(model, keep):
    # A Hugging Face tower: its embeddings and all but the last `keep` encoder layers freeze; the
    # pooler and the projection after them train. open_clip's HFTextEncoder.lock does the same,
    # but finds the layers by names its arch_dict lacks for BERT (a KeyError), so BERT-like towers
    # (transformer.embeddings, transformer.encoder.layer: BERT, RoBERTa, XLM-R) are locked here.
    transformer = model.text.transformer
    layers = getattr(getattr(transformer, "encoder", None), "layer", None)
    if layers is None or not hasattr(transformer, "embeddings"):
        model.lock_text_tower(unlocked_layers=keep)    # mT5: open_clip's names fit
        return
    for module in [transformer.embeddings, *layers[:max(len(layers) - keep, 0)]]:
        for param in module.parameters():
            param.requires_grad = False


def clamp_logit_scale(model):
    """Keep the learned temperature inside [1, 100] after each optimiser step (the stored
    parameter is its logarithm, hence 0 and LOG_MAX_LOGIT_SCALE)."""
    with torch.no_grad():
        model.logit_scale.clamp_(0, LOG_MAX_LOGIT_SCALE)


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
def encode_images(model, batches, device, precision="fp32"):
    """L2-normalised features of every image of an iterable of image batches (tensors, or
    (images, indices) pairs as a plain DataLoader yields them)."""
    model.eval()
    features = []
    for batch in batches:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        with autocast(device, precision):
            features.append(model.encode_image(images.to(device), normalize=True).float().cpu())
    return torch.cat(features) if features else torch.empty(0)


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
# Captioning (CoCa: a CLIP with a text decoder)

def is_captioner(model):
    """Whether the model writes captions: a CoCa, whose text decoder turns an image into words."""
    return isinstance(unwrap(model), open_clip.CoCa)


GENERATION_TYPES = ("beam_search", "top_p", "top_k")


@dataclass(frozen=True)
class CaptionSettings:
    """How generate_captions chooses each next token; the defaults are open_clip's
    (CoCa.generate). The one home of these settings for every script that writes captions:
    `add_arguments(parser)` adds them as --caption_<name> flags, `from_args(args)` reads them
    back, and every value is checked here (its `valid` range, settings.in_range)."""
    generation_type: str = field(default="beam_search", metadata={
        "choices": GENERATION_TYPES, "help": "beam_search: the most likely caption among num_beams kept "
        "at each step; top_p or top_k: each token drawn at random among the most likely ones"})
    max_length: int = field(default=30, metadata={
        "valid": ">= 2", "help": "tokens of a caption at most, its start and end tokens included (and at "
        "most the model's context length)"})
    min_length: int = field(default=5, metadata={
        "valid": ">= 0", "help": "the caption cannot end before it has this many tokens, its start token "
        "included"})
    num_beams: int = field(default=6, metadata={
        "valid": ">= 1", "help": "beam_search: the most likely unfinished captions kept at each step"})
    top_p: float = field(default=0.1, metadata={
        "valid": "(0, 1]", "help": "top_p: draw among the most likely tokens whose probabilities add up to "
        "top_p"})
    top_k: int = field(default=1, metadata={
        "valid": ">= 1", "help": "top_k: draw among the k most likely tokens (1: always the most likely)"})
    repetition_penalty: float = field(default=1.0, metadata={
        "valid": "> 0", "help": "the logit of a token already in the caption is divided by this when "
        "positive and multiplied when negative; 1 = no penalty"})
    temperature: float = field(default=1.0, metadata={
        "valid": "> 0", "help": "top_p and top_k: the logits are divided by this before drawing"})
    seed: int = field(default=0, metadata={"valid": ">= 0", "help": "top_p and top_k: seed of the draws"})

    def __post_init__(self):
        for f in fields(self):
            value, valid, choices = getattr(self, f.name), f.metadata.get("valid"), f.metadata.get("choices")
            if type(value) is not f.type and not (f.type is float and type(value) is int):
                raise SettingsError(f"--caption_{f.name} must be {f.type.__name__}, got {value!r}")
            if choices and value not in choices or valid and not in_range(value, valid):
                raise SettingsError(f"--caption_{f.name} must be {valid or 'one of ' + ', '.join(choices)}, "
                                    f"got {value!r}")

    @classmethod
    def add_arguments(cls, parser):
        """The settings as flags of a script's parser: --caption_max_length 20, ..."""
        group = parser.add_argument_group("captions (CoCa models)")
        for f in fields(cls):
            valid = f", valid: {f.metadata['valid']}" if "valid" in f.metadata else ""
            group.add_argument(f"--caption_{f.name}", type=f.type, default=f.default,
                               choices=f.metadata.get("choices"), metavar=f.type.__name__.upper(),
                               help=f"{f.metadata['help']} (default: {f.default!r}{valid})")

    @classmethod
    def from_args(cls, args):
        return cls(**{f.name: getattr(args, f"caption_{f.name}") for f in fields(cls)})


@torch.inference_mode()
def generate_captions(setup_or_model, tokenizer, images, settings=None, precision="fp32", **overrides):
    """A caption for each image of a batch, as text: list[str], one per image.

    setup_or_model: a ClipSetup (its tokenizer is used when `tokenizer` is None) or a captioner
        (a CoCa, also inside DDP or torch.compile); ModelError for a model without a decoder.
    tokenizer: CLIP's tokenizer (ours, CaptionTokenizer, or open_clip's SimpleTokenizer): its
        start and end tokens frame the caption, and it turns the ids back into words.
    images: a tensor [N, 3, H, W] prepared as for encode_images (the setup's preprocess_cfg).
    settings: CaptionSettings (default: open_clip's); `overrides` change some of them
        (generate_captions(setup, None, images, num_beams=3)).

    The image tower runs once; then the decoder extends each caption by one token at a time
    (its text tower and decoder read the whole caption so far: open_clip keeps no cache). The
    returned text is the tokens between the start and the end token, decoded and stripped. The
    model is put in eval mode, without gradients, with `precision`'s autocast, as encode_images
    does; an untrained model writes strings too (of random words). Captions are at most
    max_length tokens and at most the model's context length. The padding token is never
    written: it is CLIP's "!", which no CoCa is trained to write (CaptionLoss).
    """
    settings = dataclasses.replace(settings or CaptionSettings(), **overrides)
    model = unwrap(getattr(setup_or_model, "model", setup_or_model))
    vocabulary = _clip_vocabulary(tokenizer or setup_or_model.tokenizer)
    if not is_captioner(model):
        raise ModelError(f"{type(model).__name__} has no text decoder to write captions: captions need a "
                         f"captioner (CoCa: --model_name tiny-coca-64, coca_ViT-B-32)")
    device = next(model.parameters()).device
    max_length = min(settings.max_length, model.text.context_length, model.text_decoder.context_length + 1)
    model.eval()
    with autocast(device, precision), _last_position_only(model.text_decoder):
        decode = _beam_search if settings.generation_type == "beam_search" else _sample
        sequences = decode(NextTokenScorer(model, images.to(device), vocabulary, settings), max_length)
    return [vocabulary.decode(ids).strip() for ids in sequences]


@contextlib.contextmanager
def _last_position_only(decoder):
    """The decoder's final norm passes on its last position alone. Writing a caption needs the
    logits of the last position only, and the projection onto the vocabulary after that norm
    (49,408 outputs a position) costs five times the rest of the tiny preset's decoder."""
    handle = decoder.ln_final.register_forward_hook(lambda module, inputs, output: output[:, -1:])
    try:
        yield
    finally:
        handle.remove()


def _clip_vocabulary(tokenizer):
    inner = tokenizer.tokenizer if isinstance(tokenizer, CaptionTokenizer) else tokenizer
    if not isinstance(inner, open_clip.tokenizer.SimpleTokenizer):
        raise ModelError(f"captions are written with CLIP's tokenizer (open_clip's SimpleTokenizer), not "
                         f"{type(inner).__name__}")
    return inner


class NextTokenScorer:
    """The next-token scores of a captioner for a batch of images, the image tower run once;
    the rules of CaptionSettings that forbid or penalise tokens are applied here."""

    def __init__(self, model, images, vocabulary, settings):
        self.model, self.settings = model, settings
        self.start, self.end, self.pad = vocabulary.sot_token_id, vocabulary.eot_token_id, model.pad_id
        self.latent, self.embs = model._encode_image(images)        # [N, D], [N, queries - 1, D]

    def repeat(self, k):
        """Each image k times over, for k beams."""
        self.latent, self.embs = (t.repeat_interleave(k, dim=0) for t in (self.latent, self.embs))

    def logits(self, tokens):
        """float32 logits [N, V] of the token after `tokens` [N, T] (start token first)."""
        out = self.model(None, tokens, image_latent=self.latent, image_embs=self.embs, output_labels=False)
        logits = out["logits"][:, -1].float()
        logits[:, self.pad] = -math.inf
        if tokens.shape[1] < self.settings.min_length:
            logits[:, self.end] = -math.inf
        penalty = self.settings.repetition_penalty
        if penalty != 1.0:
            seen = logits.gather(1, tokens)
            logits.scatter_(1, tokens, torch.where(seen > 0, seen / penalty, seen * penalty))
        return logits


def _beam_search(scorer, max_length):
    """The caption of highest mean log-probability per token among those that beam search finds.

    Each step extends every kept caption by every token and keeps the num_beams most likely
    (sum of log-probabilities). An extension by the end token among the 2 x num_beams best is a
    finished caption; an image is done when it has num_beams of them (or at max_length, where
    the unfinished ones count as finished). The finished caption of highest mean log-probability
    wins: the sum alone would favour short captions. (open_clip splits its 6 beams into 3 groups
    that, without a diversity penalty, search alike, and adds raw logits instead of
    log-probabilities; here the 6 beams search together.)
    """
    k = scorer.settings.num_beams
    n = scorer.latent.shape[0]
    scorer.repeat(k)
    tokens = torch.full((n * k, 1), scorer.start, device=scorer.latent.device)
    scores = torch.full((n, k), -math.inf, device=tokens.device)
    scores[:, 0] = 0.0               # one caption to start from: k copies would fill the beams alike
    finished = [[] for _ in range(n)]   # (mean log-probability, token ids) of each image
    for length in range(2, max_length + 1):
        log_probs = scorer.logits(tokens).log_softmax(dim=-1)                     # [n k, V]
        vocabulary = log_probs.shape[1]
        candidates = (scores.reshape(-1, 1) + log_probs).reshape(n, k * vocabulary)
        best, where = candidates.topk(2 * k, dim=1)     # 2k: k survive even if k of them end
        keep, kept_scores = [], []
        for i in range(n):
            row = []
            for score, index in zip(best[i].tolist(), where[i].tolist()):
                beam, token = i * k + index // vocabulary, index % vocabulary
                ids = tokens[beam, 1:].tolist() + [token]
                if token == scorer.end or length == max_length:
                    if len(finished[i]) < k and score > -math.inf:
                        finished[i].append((score / len(ids), ids[:-1] if token == scorer.end else ids))
                elif len(row) < k:
                    row.append((score, beam, token))
            row += [(-math.inf, i * k, scorer.end)] * (k - len(row))    # a done image's places
            keep += [(beam, token) for _, beam, token in row]
            kept_scores.append([score for score, _, _ in row])
        if all(len(f) >= k for f in finished):
            break
        beams, next_tokens = (torch.tensor(column, device=tokens.device) for column in zip(*keep))
        tokens = torch.cat([tokens[beams], next_tokens[:, None]], dim=1)
        scores = torch.tensor(kept_scores, device=tokens.device)
    return [max(f)[1] for f in finished]


def _sample(scorer, max_length):
    """Each token drawn at random among the most likely: the top_k of them, or the fewest whose
    probabilities add up to top_p (nucleus sampling, Holtzman et al. 2020), from the softmax of
    the logits divided by the temperature. top_k 1 is greedy decoding. A caption ends at the end
    token, or at max_length."""
    s = scorer.settings
    tokens = torch.full((scorer.latent.shape[0], 1), scorer.start, device=scorer.latent.device)
    done = torch.zeros(len(tokens), dtype=torch.bool, device=tokens.device)
    generator = torch.Generator(tokens.device).manual_seed(s.seed)
    while tokens.shape[1] < max_length and not done.all():
        logits = scorer.logits(tokens)
        if s.generation_type == "top_k":
            candidates, ids = logits.topk(s.top_k, dim=1)                          # [N, k]
        else:
            candidates, ids = logits.sort(dim=1, descending=True)
            probs = candidates.softmax(dim=1)
            kept = probs.cumsum(dim=1) - probs < s.top_p      # the mass before it; the first always stays
            width = int(kept.sum(dim=1).max())
            candidates, ids = candidates[:, :width].masked_fill(~kept[:, :width], -math.inf), ids[:, :width]
        choice = torch.multinomial((candidates / s.temperature).softmax(dim=1), 1, generator=generator)
        drawn = ids.gather(1, choice)[:, 0]
        tokens = torch.cat([tokens, torch.where(done, scorer.end, drawn)[:, None]], dim=1)
        done |= drawn == scorer.end
    return [row[1:row.index(scorer.end)] if scorer.end in row else row[1:] for row in tokens.tolist()]


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


class DistillationLoss(nn.Module):
    r"""Knowledge distillation: the student learns to see a batch as the teacher sees it
    (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network").

    Both models score every image-text pair of the batch, each from its own inputs of the same
    images and captions. With the student's normalised features x_i, y_j and logit scale s, the
    teacher's x'_i, y'_j and s', and the distillation temperature T:

        Q_ij = softmax_j( s  x_i . y_j   / T )      the student's odds that text j is image i's
        P_ij = softmax_j( s' x'_i . y'_j / T )      the teacher's
        KL_I = 1/B sum_i sum_j P_ij (log P_ij - log Q_ij)        image -> text (rows)
        KL_T = the same with the softmax over i (columns)         text -> image
        loss = T^2 (KL_I + KL_T) / 2

    The contrastive loss only says which caption is right. P also says how wrong each wrong one
    is (a red circle is nearer "a red square" than "a blue star"), knowledge a small model
    cannot get as fast from B one-hot targets; T > 1 softens P so that these small odds weigh.
    Why T^2: the gradient of KL with respect to a logit is (Q - P) / T, and for large T,
    Q - P is about (student logit - teacher logit) / (B T), so without the factor the gradient
    would shrink as 1 / T^2 and raising T would quietly turn the term down against the
    contrastive loss. With it, T sets the softness and the weight alone sets the share.

    SigLIP students (sigmoid=True) answer each pair on its own, yes or no, so the term is the
    binary KL between the teacher's and the student's probability of each pair, with their
    learned biases b and b' (a teacher without one, a softmax CLIP, has no such probabilities):

        q_ij = sigmoid((s x_i . y_j + b) / T),   p_ij = sigmoid((s' x'_i . y'_j + b') / T)
        loss = T^2 / B sum_i sum_j [ p_ij log(p_ij / q_ij) + (1 - p_ij) log((1 - p_ij) / (1 - q_ij)) ]

    with rows of this process's images against the global batch's texts, as SigLipLoss has.

    The feature term (feature_dims=(student width, teacher width)) is added to the output term:
    the student's features, mapped into the teacher's space by a learned linear map M when the
    widths differ (else M is the identity), should point where the teacher's do:

        F = 1/2B sum_i [ (1 - cos(M x_i, x'_i)) + (1 - cos(M y_i, y'_i)) ]

    One M for both towers, since the images and texts of each model share one space. M serves
    training only: it is not part of the student's model and is dropped after training.

    Across processes every feature is gathered (the student's with gradient), so B is the
    global batch as in ContrastiveLoss; local_loss keeps this process's rows of the softmax
    term. The feature term is taken over the global batch on every process: M lives outside
    DistributedDataParallel, and this way every process computes the same gradient for it.
    `train_map=False` computes the same loss with M held fixed: train_step.cached_backward gives M its
    gradient in one of the passes over accumulated micro-batches, as it does the temperature.
    """

    def __init__(self, temperature=4.0, sigmoid=False, local_loss=False, feature_dims=None):
        super().__init__()
        self.temperature, self.sigmoid, self.local_loss = temperature, sigmoid, local_loss
        self.features = feature_dims is not None
        self.map = None
        if self.features and feature_dims[0] != feature_dims[1]:
            student_width, teacher_width = feature_dims
            # orthonormal columns (or rows): M starts by keeping lengths, so cos means something
            self.map = nn.Parameter(nn.init.orthogonal_(torch.empty(teacher_width, student_width)))

    def forward(self, student, teacher, train_map=True):
        """student, teacher: open_clip's output dicts (image_features, text_features, logit_scale
        and, for SigLIP, logit_bias) of the same batch."""
        x, y = gather_features(student["image_features"]), gather_features(student["text_features"])
        x_t, y_t = gather_features(teacher["image_features"]), gather_features(teacher["text_features"])
        T = self.temperature
        if self.sigmoid:
            loss = T ** 2 * _binary_kl(
                (teacher["logit_scale"] * teacher["image_features"] @ y_t.T + teacher["logit_bias"]) / T,
                (student["logit_scale"] * student["image_features"] @ y.T + student["logit_bias"]) / T)
        else:
            s, s_t = student["logit_scale"], teacher["logit_scale"]
            rows = (student["image_features"], student["text_features"], teacher["image_features"],
                    teacher["text_features"]) if self.local_loss else (x, y, x_t, y_t)
            kl_images = _softmax_kl(s_t * rows[2] @ y_t.T / T, s * rows[0] @ y.T / T)
            kl_texts = _softmax_kl(s_t * rows[3] @ x_t.T / T, s * rows[1] @ x.T / T)
            loss = T ** 2 * (kl_images + kl_texts) / 2
        if self.features:
            loss = loss + self._feature_term(x, y, x_t, y_t, train_map)
        return loss

    def _feature_term(self, x, y, x_t, y_t, train_map):
        M = None if self.map is None else self.map if train_map else self.map.detach()

        def cos_distance(f, f_t):
            mapped = F.normalize(f if M is None else f @ M.T, dim=-1)
            return (1 - (mapped * f_t).sum(dim=-1)).mean()
        return (cos_distance(x, x_t) + cos_distance(y, y_t)) / 2


def _softmax_kl(teacher_logits, student_logits):
    """1/rows sum_i KL( softmax(teacher_i) || softmax(student_i) ), from log-probabilities."""
    log_p, log_q = F.log_softmax(teacher_logits, dim=1), F.log_softmax(student_logits, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()


def _binary_kl(teacher_logits, student_logits):
    """1/rows sum_ij KL( Bernoulli(sigmoid(a_ij)) || Bernoulli(sigmoid(c_ij)) ), a = teacher's,
    c = student's logits, with log sigmoid for log p and log(1 - p) = log sigmoid(-a)."""
    a, c = teacher_logits, student_logits
    p = torch.sigmoid(a)
    kl = p * (F.logsigmoid(a) - F.logsigmoid(c)) + (1 - p) * (F.logsigmoid(-a) - F.logsigmoid(-c))
    return kl.sum() / a.shape[0]


class CaptionLoss(nn.Module):
    r"""The captioning loss of CoCa (Contrastive Captioners, Yu et al. 2022).

    A text decoder reads the image (the tokens of its attention pooler) and the caption's tokens
    before position t, and predicts token t. It always reads the true tokens, never its own
    guesses ("teacher forcing"), so every position of every caption trains in one pass:

        loss = -1/N sum_{b, t: y_bt != pad} log p(y_bt | image_b, y_b<t)

    y are the caption's tokens after the start token (open_clip's `labels`, text[:, 1:]) and N
    the number of them that are not padding. Padding is token 0, which is also "!" in CLIP's
    vocabulary: open_clip never uses it as a label, so a CoCa never learns to write "!".

    N is counted over the whole step before any pass (`label_tokens`) and the cross-entropies
    are summed, so the micro-batches of an accumulated step, each divided by the same N, add up
    to the mean of the big batch: their gradients too, exactly (train_step.cached_backward).
    Across processes N is the mean count per process, N_global / R: DDP averages the gradients of
    the R processes, which turns their sums into the mean over all N_global tokens. (Each
    process's own mean, as open_clip's CoCaLoss takes, weighs a token more where a process has
    fewer; the count costs one all-reduce of a number per step.)

    The model's loss is contrastive + weight x caption (open_clip's default weight: 2).
    """

    def __init__(self, weight, pad_id=0):
        super().__init__()
        self.weight, self.pad_id = weight, pad_id

    def label_tokens(self, texts):
        """N of a step whose micro-batches hold these token tensors, averaged over processes."""
        count = sum((tokens[:, 1:] != self.pad_id).sum() for tokens in texts)
        rank, world_size = world_info()
        if world_size > 1:
            dist.all_reduce(count)
        return count / world_size

    def forward(self, logits, labels, tokens):
        """logits [B, T, V] of the decoder, labels [B, T], tokens: N (label_tokens)."""
        kept = labels != self.pad_id
        # float32: a bfloat16 softmax over 49,408 tokens rounds the small probabilities away
        return F.cross_entropy(logits[kept].float(), labels[kept], reduction="sum") / tokens


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
    """Write a checkpoint whole or not at all (files.atomic_write): a run killed mid-save leaves
    the previous checkpoint intact, and a save that fails (a full disk) raises OutputError naming
    the folder. The weights sit under "state_dict", the key open_clip reads, so
    open_clip.create_model(name, pretrained=path) loads our checkpoints. A Hugging Face text tower's
    config and tokenizer files sit under "text_files" (TEXT_FILES), so that the checkpoint rebuilds
    without the hub (model_from_checkpoint).
    """
    path = Path(path)
    payload = {"format": CHECKPOINT_FORMAT, "state_dict": unwrap(setup.model).state_dict(),
               "model_name": setup.model_name, "model_config": setup.model_config, "text_files": setup.text_files,
               "preprocess_cfg": {k: list(v) if isinstance(v, tuple) else v
                                  for k, v in setup.preprocess_cfg.items()},
               **training_state}
    try:
        with files.atomic_write(path) as f:
            torch.save(payload, f)
    except RuntimeError as error:
        # torch.save reports a failed write as a RuntimeError of its zip writer, without the
        # errno; a disk with less room than the checkpoint needs tells what happened.
        needed = sum(t.numel() * t.element_size() for t in payload["state_dict"].values())
        if shutil.disk_usage(path.parent).free < needed:
            raise OutputError(f"{path.name} not written: {disk_full_message(error, path.parent)}") from None
        raise


def _refused_by_weights_only(error):
    """The file is a valid pickle that names Python code (a global torch does not allow)."""
    message = str(error).lower()
    return isinstance(error, pickle.UnpicklingError) and "weights only" in message and \
        "unsupported global" in message


def _unsafe_file_message(path):
    # torch's own message advises weights_only=False; for a file of unknown origin that advice
    # is the attack, so it is not passed on.
    return (f"{path} was NOT loaded: besides tensors it holds Python objects, and unpickling them "
            f"could run any code. Checkpoints written by train.py and open_clip weights hold only "
            f"tensors and plain values; get the file from its author again, or save just its "
            f"weights (a state_dict) where it was made")


def load_checkpoint(path):
    """Read a checkpoint safely: weights_only=True can never run code hidden in the file, and
    what it holds is checked before anything is built from it (check_state_dict; the model
    config when a model is built, check_model_config)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a damaged zip archive
        if _refused_by_weights_only(error):
            raise CheckpointError(_unsafe_file_message(path)) from None
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({_first_line(error)}). The file is "
            f"truncated or corrupt, e.g. copied while it was being written; use another "
            f"checkpoint of the run (last.pt / best.pt)") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"checkpoint {path} has no 'state_dict': not a model checkpoint")
    version = checkpoint.get("format", 1)
    if type(version) is not int or version < 1:
        raise CheckpointError(f"checkpoint {path} has format {short_repr(version)}, not a format of ours "
                              f"(a whole number from 1 to {CHECKPOINT_FORMAT}): not our checkpoint")
    if version > CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {version}, written by a "
                              f"newer version of this code (this one reads up to format "
                              f"{CHECKPOINT_FORMAT}); update the code")
    check_state_dict(checkpoint["state_dict"], f"checkpoint {path}")
    return checkpoint


# ----------------------------------------------------------------------------------------------
# Checking what a file asks us to build: every checkpoint, weights file and model folder goes
# through check_state_dict and check_model_config before a model is built or loaded from it.

def _first_line(error):
    return f"{type(error).__name__}: " + (str(error).splitlines() or [""])[0][:200]


def check_state_dict(state, source):
    """state, after checking that it is what load_state_dict takes: tensors named by strings."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{source}: its state_dict is a {type(state).__name__}, not a "
                              f"dictionary of tensors; not a model's weights")
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: its state_dict holds a {type(value).__name__} under "
                                  f"{short_repr(name)}, where only tensors named by strings belong; "
                                  f"not a model's weights")
    return state


def check_finite_weights(model, source):
    """Refuse a model with a NaN or infinite parameter (buffers may hold -inf on purpose, as
    attention masks do). One such weight makes the outputs NaN, and what fails downstream says
    nothing of the cause: a NaN teacher makes every distillation step non-finite, and training
    stops as if its learning rate were too high."""
    parameters = dict(unwrap(model).named_parameters())
    bad = [name for name, parameter in parameters.items() if not bool(torch.isfinite(parameter).all())]
    if bad:
        raise CheckpointError(f"{source}: {len(bad)} of its {len(parameters)} weight tensors hold NaN or "
                              f"infinite values (the first: '{bad[0]}'), so every output would be NaN; "
                              f"use a checkpoint saved before its training diverged")


def _keys(value):
    """Every key of nested dicts and lists."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _keys(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _keys(item)


def _numbers(value, where=""):
    """(where, number) of every number in nested dicts and lists ('vision_cfg.width', 768)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _numbers(item, where)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield where, value


def check_model_config(model_config, preprocess_cfg, source):
    """Refuse a model config (with its preprocessing) that is not open_clip's, whose numbers are
    beyond any real model (MAX_CONFIG_NUMBER, MAX_LAYERS), or that asks transformers to run a hub
    repository's code (trust_remote_code), before anything is built."""
    if not isinstance(model_config, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(model_config) \
            or not all(isinstance(model_config[tower], dict) for tower in ("vision_cfg", "text_cfg")) \
            or not isinstance(model_config.get("multimodal_cfg", {}), dict) \
            or not isinstance(preprocess_cfg, (dict, type(None))):
        raise CheckpointError(f"{source}: its model_config is not an open_clip model config "
                              f"(needs embed_dim, vision_cfg and text_cfg, a CoCa's multimodal_cfg too, and a "
                              f"preprocess_cfg dict)")
    for where, number in _numbers({"model_config": model_config, "preprocess_cfg": preprocess_cfg or {}}):
        if not abs(number) <= MAX_CONFIG_NUMBER:
            raise CheckpointError(f"{source}: its {short_repr(where)} is {short_repr(number)}, beyond "
                                  f"any real model (at most {MAX_CONFIG_NUMBER}); not building it")
    for tower in ("vision_cfg", "text_cfg", "multimodal_cfg"):
        layers = sum(number for _, number in _numbers(model_config.get(tower, {}).get("layers")))
        if layers > MAX_LAYERS:
            raise CheckpointError(f"{source}: its {tower} has {layers} layers, beyond any real model "
                                  f"(at most {MAX_LAYERS}); not building it")
    if "trust_remote_code" in _keys(model_config):
        # open_clip passes text_cfg.tokenizer_kwargs to transformers, which would then run the
        # Python code of the tokenizer's hub repository
        raise CheckpointError(f"{source}: its model_config asks for trust_remote_code, which would run code from "
                              f"the Hugging Face hub; not building it")


def check_text_files(text_files, source):
    """text_files (a checkpoint's, or None when it has none), refused unless they are what a text
    tower and its tokenizer are built from: names of TEXT_FILES only (each becomes a file of that
    fixed name in a private temporary folder), UTF-8 text of at most MAX_TEXT_FILES_BYTES in all,
    JSON files without auto_map (with which transformers would import code named by the file), and
    a tower config.json of a model type open_clip builds, whose numbers are bounded as a model
    config's are (MAX_CONFIG_NUMBER, MAX_LAYERS). Returns them, {} for None."""
    if text_files is None:
        return {}
    if not isinstance(text_files, dict):
        raise CheckpointError(f"{source}: its text_files is a {type(text_files).__name__}, not a dictionary of "
                              f"file names and their text")
    for name, text in text_files.items():
        if not isinstance(name, str) or name not in TEXT_FILES:
            raise CheckpointError(f"{source}: its text_files holds {short_repr(name)}, not one of the files a text "
                                  f"tower is built from ({', '.join(TEXT_FILES)}); not writing it")
        if not isinstance(text, str):
            raise CheckpointError(f"{source}: its text_files holds a {type(text).__name__} as {name}, where only "
                                  f"text belongs")
    try:   # a character is 1 to 4 bytes: a text of more characters than the bound is not encoded
        size = sum(len(text) if len(text) > MAX_TEXT_FILES_BYTES else len(text.encode("utf-8"))
                   for text in text_files.values())
    except UnicodeEncodeError:
        raise CheckpointError(f"{source}: its text_files hold text that cannot be written as UTF-8") from None
    if size > MAX_TEXT_FILES_BYTES:
        raise CheckpointError(f"{source}: its text_files hold more than {MAX_TEXT_FILES_BYTES:,} bytes, beyond "
                              f"what a text tower's config and tokenizer need; not writing them")
    contents = {}
    for name in ("config.json", "tokenizer_config.json", "special_tokens_map.json"):
        if name not in text_files:
            continue
        try:
            contents[name] = json.loads(text_files[name])
        except (ValueError, RecursionError):
            raise CheckpointError(f"{source}: its text_files' {name} is not JSON") from None
        if not isinstance(contents[name], dict):
            raise CheckpointError(f"{source}: its text_files' {name} is not a JSON object")
        if "auto_map" in contents[name]:
            raise CheckpointError(f"{source}: its text_files' {name} has an auto_map, with which transformers "
                                  f"would run code the file names; not building it")
    if "config.json" in contents:
        _check_text_tower_config(contents["config.json"], source)
    return text_files


def _check_text_tower_config(tower, source):
    kinds = open_clip.hf_model.arch_dict      # the model types whose text towers open_clip builds
    kind = tower.get("model_type")
    if not isinstance(kind, str) or kind not in kinds:
        raise CheckpointError(f"{source}: its text_files' config.json is of model type {short_repr(kind)}, not "
                              f"one whose text tower open_clip builds ({', '.join(kinds)})")
    for where, number in _numbers(tower):
        if not abs(number) <= MAX_CONFIG_NUMBER:
            raise CheckpointError(f"{source}: its text_files' config.json has {short_repr(where)} "
                                  f"{short_repr(number)}, beyond any real model (at most {MAX_CONFIG_NUMBER}); "
                                  f"not building it")
    layers = tower.get(kinds[kind]["config_names"]["layers"])
    if isinstance(layers, (int, float)) and layers > MAX_LAYERS:
        raise CheckpointError(f"{source}: its text_files' config.json has {layers} layers, beyond any real "
                              f"model (at most {MAX_LAYERS}); not building it")


def _create_within_bounds(create, source):
    """create(device), a model, once its size is known to be within MAX_PARAMETERS: it is built
    first on PyTorch's meta device, which records shapes without allocating, so the count is
    exact (open_clip's own code, whatever the architecture) and costs no memory."""
    with torch.device("meta"), _quiet_open_clip():
        count = count_parameters(create("meta"))
    if count > MAX_PARAMETERS:
        raise CheckpointError(f"{source}: its model_config describes {count:,} parameters, beyond any "
                              f"real model (at most {MAX_PARAMETERS:,}); not building it")
    with _quiet_open_clip():
        return create("cpu")


@contextlib.contextmanager
def _config_errors(source, what, way_out=""):
    """open_clip's errors while building a model from a file's config, as one CheckpointError
    line, ending with way_out. A config from elsewhere can make open_clip fail in any way
    (TypeError for an unknown key, ImportError for a Hugging Face tower without transformers,
    ...): all are the file's."""
    try:
        yield
    except UserError:
        raise
    except Exception as error:
        if _refused_by_weights_only(error):
            raise CheckpointError(_unsafe_file_message(source)) from None
        raise CheckpointError(f"{source}: {what} ({_first_line(error)}){way_out}") from None


def load_weights(model, state_dict, source, model_name):
    """model.load_state_dict, with a one-line CheckpointError when the weights are of another
    architecture (torch's own message lists every tensor: over a hundred lines)."""
    try:
        unwrap(model).load_state_dict(state_dict)
    except RuntimeError:
        expected = unwrap(model).state_dict()
        raise CheckpointError(f"{source} " + state_dict_difference(
            state_dict, expected, None, model_name)) from None


def model_from_folder(folder, device="cpu"):
    """Load an open_clip model folder: open_clip_config.json ({"model_cfg", "preprocess_cfg"})
    beside its weights (open_clip_model.safetensors, ...), as open_clip's save_for_hf writes
    them and Hugging Face hub repositories hold them, through open_clip's "local-dir:" schema.
    Returns a ClipSetup. A folder without weights is refused (open_clip would use random ones);
    its config is checked as a checkpoint's is (check_model_config, MAX_PARAMETERS)."""
    folder = Path(folder)
    config_file = folder / "open_clip_config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
        model_config, preprocess_cfg = config["model_cfg"], config.get("preprocess_cfg")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ModelError(f"{folder}: not an open_clip model folder ({config_file.name} with a "
                         f"'model_cfg' cannot be read: {type(error).__name__}: {error})") from None
    if not any(next(folder.glob(pattern), None) for pattern in ("*.safetensors", "*.bin", "*.pth")):
        raise ModelError(f"{folder}: holds {config_file.name} but no weights (.safetensors, .bin "
                         f"or .pth); copy the model's weights file into it")
    check_model_config(model_config, preprocess_cfg, config_file)
    name = f"local-dir:{folder}"
    with _config_errors(folder, "open_clip cannot load this model folder"):
        model = _create_within_bounds(lambda device: open_clip.create_model(
            name, output_dict=True, device=device, load_weights=device != "meta"), config_file)
        tokenizer = open_clip.get_tokenizer(name)
    model.to(device)
    return ClipSetup(model=model, tokenizer=CaptionTokenizer(tokenizer),
                     preprocess_cfg=dict(model.visual.preprocess_cfg), model_name=folder.name,
                     model_config=model_config)


def model_from_checkpoint(path, device="cpu"):
    """Rebuild a model from one of our checkpoints alone, without the network: a Hugging Face text
    tower and tokenizer from the files the checkpoint carries (text_files; one written before they
    were carried reads them from the hub or its cache). Returns (ClipSetup, checkpoint)."""
    checkpoint = load_checkpoint(path)
    if "model_config" not in checkpoint:
        raise CheckpointError(f"checkpoint {path} has weights but no model config; load it with "
                              f"--model_name NAME --pretrained {path} instead")
    loss = "siglip" if "logit_bias" in checkpoint["state_dict"] else "clip"
    try:
        setup = build_model(str(checkpoint.get("model_name", "model")), device=device, loss=loss,
                            model_config=checkpoint["model_config"], preprocess_cfg=checkpoint.get("preprocess_cfg"),
                            text_files=checkpoint.get("text_files"))
    except CheckpointError as error:   # it names the model; the file is what the user can find
        raise CheckpointError(f"checkpoint {path}: {error}") from None
    load_weights(setup.model, checkpoint["state_dict"], path, setup.model_name)
    return setup, checkpoint
