"""A model in Hugging Face transformers' CLIP format: config.json, model.safetensors and the
processor (tokenizer and image processor), which CLIPModel.from_pretrained, AutoProcessor and
pipeline("zero-shot-image-classification") load. export.py writes and checks it (--transformers).

transformers' CLIPModel is OpenAI's CLIP: a plain ViT image tower (class token, LayerNorm before
and after the blocks) and a causal text Transformer pooled at the end-of-text token, each with a
projection without bias, and CLIP's byte-pair tokenizer. open_clip builds the same network from
the same parts when a config uses its defaults, so the weights map one to one (hf_state_dict).
Anything else is refused in one line naming the setting (unsupported): ResNet, timm and Hugging
Face towers, SigLIP (a logit bias), CoCa (a text decoder), other tokenizers, and the options
CLIPModel has no equivalent for (attentional pooling, LayerScale, no LayerNorm before the blocks,
a projection bias, other pooling, ...).

Two things do not map exactly, and the docs (docs/export.md) say so:
  - The tokenizer. transformers' CLIPTokenizer cleans text with Unicode NFC and lower case, where
    open_clip's runs ftfy and unescapes HTML: captions that ftfy or HTML unescaping change
    (curly quotes, ligatures, full-width letters, "&amp;") get other tokens. It also pads with
    the end-of-text token where open_clip pads with 0; that changes nothing, because the text
    tower is causal and pools at the first end-of-text token, which sees no padding.
  - The image processor. With backend="pil" it resizes as torchvision does, to the pixel, but
    its centre crop starts at floor((side - size) / 2) where torchvision rounds half to even:
    one pixel apart when the resized side exceeds the crop by 3 (mod 4). Its default backend
    ("torchvision" when torchvision is installed) resizes tensors, a grey level apart from PIL's.
"""
import dataclasses
import gzip

import open_clip
import torch
import transformers
from open_clip.tokenizer import SimpleTokenizer

import chinese_clip
import files
import prepare_image

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
PROCESSOR_FILES = ("processor_config.json", "tokenizer.json", "tokenizer_config.json")
FILES = (CONFIG_FILE, WEIGHTS_FILE, *PROCESSOR_FILES)
# transformers pools the text at the first position holding eos_token_id (the value 2 would select
# its older rule, the highest id, which is the same token for CLIP's vocabulary).
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
BOS_ID, EOS_ID = 49406, 49407
RESAMPLE = {"bicubic": 3, "bilinear": 2}   # PIL's numbers, as transformers stores them

# open_clip's CLIPVisionCfg and CLIPTextCfg settings that CLIPModel expresses (they go into its
# config) or that do not change what a trained model computes: patch_dropout acts in training
# only; LayerNorm acts on each token alone, so pooling before or after it (final_ln_after_pool)
# is the same; the timm_* and hf_* settings describe towers refused by name. Every other setting
# must be at open_clip's default.
FREE_SETTINGS = {
    "vision_cfg": {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size", "patch_dropout",
                   "final_ln_after_pool", "output_tokens", "norm_kwargs", "timm_model_pretrained", "timm_pool",
                   "timm_proj", "timm_proj_bias", "timm_drop", "timm_drop_path"},
    "text_cfg": {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "pad_id",
                 "final_ln_after_pool", "output_tokens", "norm_kwargs", "pool_type", "eos_id", "tokenizer_kwargs",
                 "hf_model_pretrained", "hf_proj_type", "hf_pooler_type"},
}
DEFAULTS = {"vision_cfg": open_clip.model.CLIPVisionCfg, "text_cfg": open_clip.model.CLIPTextCfg}
TOP_LEVEL = {"embed_dim", "vision_cfg", "text_cfg", "custom_text", "quick_gelu"}


def unsupported(setup) -> str | None:
    """Why transformers' CLIPModel cannot hold this model, in one line; None when it can."""
    cfg = setup.model_config
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    named = [
        (chinese_clip.is_name(setup.model_name), "a Chinese-CLIP model (a BERT text tower): CLIPModel's text tower "
                                                 "is CLIP's own Transformer, and transformers' ChineseCLIPModel, "
                                                 "which holds this kind, is not written here"),
        ("init_logit_bias" in cfg or getattr(setup.model, "logit_bias", None) is not None,
         "a SigLIP model (a learned logit bias): CLIPModel has none, and SiglipModel is not written here"),
        ("multimodal_cfg" in cfg, "a CoCa model: CLIPModel has no text decoder"),
        (not isinstance(vision.get("layers", 12), int), "a ResNet image tower: CLIPModel's is a ViT"),
        (bool(vision.get("timm_model_name")), f"the timm image tower {vision.get('timm_model_name')}: "
                                              f"CLIPModel's is CLIP's own ViT"),
        (bool(text.get("hf_model_name")), f"the Hugging Face text tower {text.get('hf_model_name')}: "
                                          f"CLIPModel's is CLIP's own Transformer"),
        (bool(text.get("hf_tokenizer_name")) or not isinstance(open_clip_tokenizer(setup), SimpleTokenizer),
         f"the tokenizer {text.get('hf_tokenizer_name') or type(open_clip_tokenizer(setup)).__name__}: "
         f"CLIPTokenizer is CLIP's byte-pair encoding"),
    ]
    for refused, reason in named:
        if refused:
            return reason
    if set(cfg) - TOP_LEVEL:
        return f"the setting {sorted(set(cfg) - TOP_LEVEL)[0]}: CLIPModel has no equivalent"
    for key, value in [*((("vision_cfg", k), v) for k, v in vision.items()),
                       *((("text_cfg", k), v) for k, v in text.items())]:
        reason = setting_refused(*key, value)
        if reason:
            return reason
    if text.get("pool_type") == "eos" and text.get("eos_id") != EOS_ID:
        return f"text_cfg.eos_id={text.get('eos_id')!r}: CLIP's end-of-text token is 49407"
    return processor_refused(setup.preprocess_cfg)


def setting_refused(tower, key, value) -> str | None:
    """The reason a setting of a tower's config is refused, or None."""
    where = f"{tower}.{key}={value!r}"
    if key == "vocab_size" and value != 49408:
        return f"{where}: CLIPTokenizer's vocabulary has 49408 tokens"
    if key == "pool_type" and tower == "text_cfg" and value not in ("argmax", "eos"):
        return f"{where}: CLIPModel pools the text at its end-of-text token"
    if key == "norm_kwargs" and value and set(value) != {"eps"}:
        return f"{where}: CLIPModel's LayerNorm takes an epsilon only"
    if key == "tokenizer_kwargs" and value and (value.get("clean", "lower") != "lower" or set(value) - {"clean"}):
        return f"{where}: CLIPTokenizer lower-cases, as open_clip's default"
    if key in FREE_SETTINGS[tower]:
        return None
    fields = {field.name: field.default for field in dataclasses.fields(DEFAULTS[tower])}
    if key in fields and value != fields[key]:
        return f"{where} (open_clip's default {fields[key]!r}): CLIPModel has no equivalent"
    return None


def processor_refused(preprocess_cfg) -> str | None:
    """Why CLIPImageProcessor cannot prepare images as our evaluation does, or None."""
    size = preprocess_cfg["size"]
    mode = preprocess_cfg.get("resize_mode", "shortest")
    if mode not in ("shortest", "squash") or preprocess_cfg.get("interpolation", "bicubic") not in RESAMPLE:
        return (f"preprocessing {mode}/{preprocess_cfg.get('interpolation')}: CLIPImageProcessor resizes the "
                f"shortest side or to the size, bicubic or bilinear")
    if isinstance(size, (list, tuple)) and size[0] != size[1]:
        return f"the image size {size[0]} x {size[1]}: CLIPModel's images are square"
    return None


def open_clip_tokenizer(setup):
    """open_clip's tokenizer inside our CaptionTokenizer."""
    return getattr(setup.tokenizer, "tokenizer", setup.tokenizer)


# ----------------------------------------------------------------------------------------------
# Config and weights

def eps(tower_cfg) -> float:
    return (tower_cfg.get("norm_kwargs") or {}).get("eps", 1e-5)   # open_clip's LayerNorm default


def size_of(value) -> int:
    return value[0] if isinstance(value, (list, tuple)) else value


def hf_config(setup) -> dict:
    """CLIPConfig's fields for an open_clip config that unsupported() accepts."""
    cfg, model = setup.model_config, setup.model
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    # open_clip's default is nn.GELU (the exact, erf form: transformers' "gelu"); OpenAI's models
    # were trained with x * sigmoid(1.702 x), QuickGELU ("quick_gelu").
    activation = "quick_gelu" if cfg.get("quick_gelu") else "gelu"
    vision_width, text_width = vision.get("width", 768), text.get("width", 512)
    return {
        "projection_dim": cfg["embed_dim"],
        "logit_scale_init_value": float(model.logit_scale.detach()),
        "vision_config": {
            "hidden_size": vision_width, "intermediate_size": int(vision_width * vision.get("mlp_ratio", 4.0)),
            "num_hidden_layers": vision.get("layers", 12),
            "num_attention_heads": vision_width // vision.get("head_width", 64),
            "image_size": size_of(vision.get("image_size", 224)), "patch_size": size_of(vision.get("patch_size", 16)),
            "hidden_act": activation, "layer_norm_eps": eps(vision), "projection_dim": cfg["embed_dim"]},
        "text_config": {
            "vocab_size": text.get("vocab_size", 49408), "hidden_size": text_width,
            "intermediate_size": int(text_width * text.get("mlp_ratio", 4.0)),
            "num_hidden_layers": text.get("layers", 12), "num_attention_heads": text.get("heads", 8),
            "max_position_embeddings": text.get("context_length", 77), "hidden_act": activation,
            "layer_norm_eps": eps(text), "projection_dim": cfg["embed_dim"],
            "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": EOS_ID},
    }


def block_weights(prefix, resblocks) -> dict:
    """One residual block after another: open_clip's nn.MultiheadAttention holds the query, key
    and value projections in one [3W, W] matrix, which CLIPModel holds as three."""
    weights = {}
    for i, block in enumerate(resblocks):
        p = f"{prefix}.encoder.layers.{i}"
        for name, weight, bias in zip(("q", "k", "v"), block.attn.in_proj_weight.chunk(3),
                                      block.attn.in_proj_bias.chunk(3)):
            weights[f"{p}.self_attn.{name}_proj.weight"], weights[f"{p}.self_attn.{name}_proj.bias"] = weight, bias
        for ours, theirs in ((block.attn.out_proj, "self_attn.out_proj"), (block.ln_1, "layer_norm1"),
                             (block.ln_2, "layer_norm2"), (block.mlp.c_fc, "mlp.fc1"), (block.mlp.c_proj, "mlp.fc2")):
            weights[f"{p}.{theirs}.weight"], weights[f"{p}.{theirs}.bias"] = ours.weight, ours.bias
    return weights


def hf_state_dict(model) -> dict:
    """CLIPModel's weights from an open_clip CLIP (or CustomTextCLIP, whose text tower sits in
    model.text). Projections: open_clip multiplies x @ P, nn.Linear x @ W.T, so W = P.T."""
    visual, text = model.visual, getattr(model, "text", model)
    weights = {
        "vision_model.embeddings.class_embedding": visual.class_embedding,
        "vision_model.embeddings.patch_embedding.weight": visual.conv1.weight,
        "vision_model.embeddings.position_embedding.weight": visual.positional_embedding,
        "vision_model.pre_layrnorm.weight": visual.ln_pre.weight, "vision_model.pre_layrnorm.bias": visual.ln_pre.bias,
        "vision_model.post_layernorm.weight": visual.ln_post.weight,
        "vision_model.post_layernorm.bias": visual.ln_post.bias,
        "visual_projection.weight": visual.proj.T,
        "text_model.embeddings.token_embedding.weight": text.token_embedding.weight,
        "text_model.embeddings.position_embedding.weight": text.positional_embedding,
        "text_model.final_layer_norm.weight": text.ln_final.weight,
        "text_model.final_layer_norm.bias": text.ln_final.bias,
        "text_projection.weight": text.text_projection.T,
        "logit_scale": model.logit_scale,
        **block_weights("vision_model", visual.transformer.resblocks),
        **block_weights("text_model", text.transformer.resblocks)}
    return {name: tensor.detach().contiguous() for name, tensor in weights.items()}


# ----------------------------------------------------------------------------------------------
# Processor: tokenizer and image processor

def tokenizer(context_length):
    """CLIPTokenizer with open_clip's vocabulary and merges (the same file, OpenAI's), its two
    special tokens renamed to transformers' spelling, cut to the model's context length."""
    bpe = open_clip.tokenizer.default_bpe()
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    renamed = {"<start_of_text>": BOS, "<end_of_text>": EOS}
    vocabulary = {renamed.get(token, token): i for token, i in SimpleTokenizer(bpe).encoder.items()}
    return transformers.CLIPTokenizer(vocab=vocabulary, merges=[tuple(m.split()) for m in merges],
                                      model_max_length=context_length)


def image_processor_settings(preprocess_cfg) -> dict:
    """CLIPImageProcessor's settings for our evaluation preprocessing: the shortest side to the
    size and a centre crop (or, for "squash", the size itself), the same resampling, mean, std."""
    size = size_of(preprocess_cfg["size"])
    squash = preprocess_cfg.get("resize_mode", "shortest") == "squash"
    return {"size": {"height": size, "width": size} if squash else {"shortest_edge": size},
            "do_center_crop": not squash, "crop_size": {"height": size, "width": size},
            "resample": RESAMPLE[preprocess_cfg.get("interpolation", "bicubic")],
            "image_mean": list(preprocess_cfg["mean"]), "image_std": list(preprocess_cfg["std"]),
            "do_convert_rgb": True}   # transformers composites transparency on white, as we do


def write_folder(setup, folder) -> list:
    """config.json, model.safetensors and the processor files in folder; returns the paths."""
    config = transformers.CLIPConfig(**hf_config(setup))
    config.architectures = ["CLIPModel"]
    config.save_pretrained(folder)
    files.write_safetensors(folder / WEIGHTS_FILE, hf_state_dict(setup.model), metadata={"format": "pt"})
    processor = transformers.CLIPProcessor(
        image_processor=transformers.CLIPImageProcessorPil(**image_processor_settings(setup.preprocess_cfg)),
        tokenizer=tokenizer(setup.tokenizer.context_length))
    processor.save_pretrained(folder)
    return [folder / name for name in FILES]


# ----------------------------------------------------------------------------------------------
# Loading, as a user of transformers does

def load(folder, backend="pil"):
    """CLIPModel and its processor from the folder, by transformers alone (without the progress
    bar it draws over the tensors it loads, which would break the export's report)."""
    shown = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        model = transformers.CLIPModel.from_pretrained(folder).eval()
    finally:
        if shown:
            transformers.utils.logging.enable_progress_bar()
    return model, load_processor(folder, backend)


def load_processor(folder, backend="pil"):
    """The processor (tokenizer and image processor). transformers picks the "torchvision" backend
    of the image processor when torchvision is installed, unless told "pil"."""
    return transformers.AutoProcessor.from_pretrained(folder, backend=backend)


def crop_differs(width, height, preprocess_cfg) -> bool:
    """Whether CLIPImageProcessor's centre crop of an image of this size starts a pixel away from
    torchvision's: it starts at floor((side - size) / 2), torchvision at round((side - size) / 2),
    half to even, and the two differ when side - size is 3 (mod 4)."""
    if preprocess_cfg.get("resize_mode", "shortest") == "squash":
        return False
    size = size_of(preprocess_cfg["size"])
    resized = prepare_image.resized_size(width, height, {"image_size": [size, size]})
    return any((side - size) % 4 == 3 for side in resized)


class TransformersModel:
    """CLIPModel behind the two methods clip_model.encode_images and encode_texts call (as
    export.OnnxModel), so that its features come from the same code path as ours."""

    def __init__(self, model):
        self.model = model

    def eval(self):
        return self

    @torch.inference_mode()
    def encode_image(self, pixels, normalize=True):
        features = self.model.get_image_features(pixel_values=pixels).pooler_output
        return torch.nn.functional.normalize(features, dim=-1) if normalize else features

    @torch.inference_mode()
    def encode_text(self, tokens, normalize=True):
        features = self.model.get_text_features(input_ids=tokens).pooler_output
        return torch.nn.functional.normalize(features, dim=-1) if normalize else features


class TransformersTokenizer:
    """The processor's tokenizer as our setups call one: captions -> ids [N, context_length]."""

    def __init__(self, processor):
        self.tokenizer = processor.tokenizer
        self.context_length = processor.tokenizer.model_max_length

    def __call__(self, texts):
        return self.tokenizer(list(texts), padding="max_length", truncation=True, return_tensors="pt")["input_ids"]
