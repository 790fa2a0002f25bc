"""Chinese-CLIP's models here: its architectures as open_clip configs, and its released weights.

Chinese-CLIP (Yang et al. 2022, OFA-Sys, the `cn_clip` package) pairs OpenAI-CLIP's image towers
(ModifiedResNet, ViTs with QuickGELU) with a Chinese BERT text tower: RBT3 (3 layers) for RN50,
RoBERTa-wwm-ext-base for the ViT-B and ViT-L towers, RoBERTa-wwm-ext-large for ViT-H. A text's
feature is BERT's last hidden state at [CLS] times text_projection, a matrix without bias. open_clip
builds both towers: the image tower as for OpenAI's weights, the text tower as a Hugging Face BERT
(a CustomTextCLIP whose text_cfg pools "cls_last_hidden_state_pooler" and projects "linear"). A name

    cn-clip:VISION@TEXT    any image tower with any text tower, e.g. cn-clip:ViT-B-16@RBT3-chinese
    cn-clip:VISION         the pairing Chinese-CLIP released: cn-clip:RN50, cn-clip:ViT-B-16,
                           cn-clip:ViT-L-14, cn-clip:ViT-L-14-336, cn-clip:ViT-H-14

is turned into such a config by `architecture`, which clip_model.build_model builds as it builds
one read from a checkpoint. The BERT configs and the tokenizer are files of model_configs/cn-clip/
(its README says where each number comes from) that every checkpoint carries (clip_model.TEXT_FILES):
nothing is fetched.

Tokens, as cn_clip.clip.tokenize makes them: [CLS], the first 50 WordPiece tokens of BERT's Chinese
vocabulary (21,128 tokens, one per Chinese character; lower case, accents stripped, punctuation
split off), [SEP], then 0 ([PAD]) up to 52; the attention mask is "token != 0". Images: squashed
to the square (no centre crop), bicubic, OpenAI's mean and std.

Weights: Chinese-CLIP releases a checkpoint as its training saved it, torch.save({"epoch", "step",
"name", "state_dict", "optimizer"}), the state_dict of a DistributedDataParallel model (keys begin
with "module.", which clip_model.read_weights strips from every file), in fp16 for the most part.
`open_clip_layout` renames its text tower's tensors to open_clip's; the image tower's and the
temperature's names are open_clip's already. `--pretrained chinese-clip` downloads the released file
from the Hugging Face hub repository where cn_clip 1.6.0 downloads it (OFA-Sys/...), into the
Hugging Face cache (clip_model.resolve_pretrained: the cache first, then a probe of the host, so
that a machine without the network is told at once what to do).
"""
from pathlib import Path

from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from errors import ModelError

PREFIX = "cn-clip:"
FILES = Path(__file__).resolve().parent / "model_configs" / "cn-clip"

# The image towers, as cn_clip's model_configs/<name>.json give them: (embed_dim, open_clip's vision_cfg).
# A ResNet's layers are its four stages; a ViT's heads are width / head_width (64 unless given).
IMAGE_TOWERS = {
    "RN50": (1024, {"image_size": 224, "layers": [3, 4, 6, 3], "width": 64}),
    "ViT-B-16": (512, {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16}),
    "ViT-B-32": (512, {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32}),
    "ViT-L-14": (768, {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14}),
    "ViT-L-14-336": (768, {"image_size": 336, "layers": 24, "width": 1024, "patch_size": 14}),
    "ViT-H-14": (1024, {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14}),
}
# The text towers: folders of FILES holding the BERT config.json that cn_clip's
# model_configs/<name>.json describes. All three read the one tokenizer of FILES.
TEXT_TOWERS = ("RBT3-chinese", "RoBERTa-wwm-ext-base-chinese", "RoBERTa-wwm-ext-large-chinese")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
CONTEXT_LENGTH = 52
# The pairings Chinese-CLIP released, one per image tower: {image tower: (its text tower, the Hugging
# Face hub repository and file that cn_clip 1.6.0 downloads its weights from)} (cn_clip.clip.utils'
# _MODEL_INFO and _MODELS).
RELEASED = {
    "RN50": ("RBT3-chinese", "OFA-Sys/chinese-clip-rn50/clip_cn_rn50.pt"),
    "ViT-B-16": ("RoBERTa-wwm-ext-base-chinese", "OFA-Sys/chinese-clip-vit-base-patch16/clip_cn_vit-b-16.pt"),
    "ViT-L-14": ("RoBERTa-wwm-ext-base-chinese", "OFA-Sys/chinese-clip-vit-large-patch14/clip_cn_vit-l-14.pt"),
    "ViT-L-14-336": ("RoBERTa-wwm-ext-base-chinese",
                     "OFA-Sys/chinese-clip-vit-large-patch14-336px/clip_cn_vit-l-14-336.pt"),
    "ViT-H-14": ("RoBERTa-wwm-ext-large-chinese", "OFA-Sys/chinese-clip-vit-huge-patch14/clip_cn_vit-h-14.pt"),
}
PRETRAINED_TAG = "chinese-clip"


def is_name(model_name):
    return isinstance(model_name, str) and model_name.startswith(PREFIX)


def towers(model_name):
    """(image tower, text tower) of a cn-clip name; ModelError naming the choices otherwise."""
    pairing = model_name[len(PREFIX):]
    vision, _, text = (pairing, "", RELEASED[pairing][0]) if pairing in RELEASED else pairing.partition("@")
    if vision not in IMAGE_TOWERS or text not in TEXT_TOWERS:
        raise ModelError(f"--model_name {model_name}: not a Chinese-CLIP model; use {PREFIX}VISION@TEXT with "
                         f"VISION one of {', '.join(IMAGE_TOWERS)} and TEXT one of {', '.join(TEXT_TOWERS)}, "
                         f"or a released pairing: {', '.join(PREFIX + name for name in RELEASED)}")
    return vision, text


def architecture(model_name):
    """(model_config, preprocess_cfg, text_files) of a cn-clip name: the open_clip config of its
    towers, Chinese-CLIP's image preprocessing, and the text tower's config and tokenizer files
    (clip_model.TEXT_FILES), which the model is built from and its checkpoints carry. hf_model_name
    and hf_tokenizer_name name the folders of this repository the files come from."""
    vision, text = towers(model_name)
    embed_dim, vision_cfg = IMAGE_TOWERS[vision]
    tower_folder = FILES / text
    model_config = {
        "embed_dim": embed_dim, "quick_gelu": True, "vision_cfg": dict(vision_cfg),
        "text_cfg": {"hf_model_name": _repository_path(tower_folder), "hf_tokenizer_name": _repository_path(FILES),
                     "hf_proj_type": "linear", "hf_pooler_type": "cls_last_hidden_state_pooler",
                     "context_length": CONTEXT_LENGTH}}
    # cn_clip.clip.utils.image_transform: Resize((size, size)), bicubic, OpenAI's mean and std
    preprocess_cfg = {"mean": OPENAI_DATASET_MEAN, "std": OPENAI_DATASET_STD, "interpolation": "bicubic",
                      "resize_mode": "squash"}
    text_files = {name: (folder / name).read_text(encoding="utf-8")
                  for folder, name in [(tower_folder, "config.json"), *((FILES, n) for n in TOKENIZER_FILES)]}
    return model_config, preprocess_cfg, text_files


def _repository_path(path):
    # a path from the repository's root: checkpoints name where the files came from, not this machine's folders
    return str(path.relative_to(FILES.parent.parent))


def pretrained_cfg(model_name, tag):
    """open_clip's pretrained config of a tag ({"hf_hub": "org/repo/file"}), {} when the name has no
    such tag: `chinese-clip` is the weights Chinese-CLIP released for its pairing."""
    vision, text = towers(model_name)
    released_text, hub = RELEASED.get(vision, (None, None))
    return {"hf_hub": hub} if tag == PRETRAINED_TAG and text == released_text else {}


def pretrained_tags(model_name):
    return [PRETRAINED_TAG] if pretrained_cfg(model_name, PRETRAINED_TAG) else []


def download_command(tag_cfg):
    """A command that puts a tag's weights into the Hugging Face cache, for a machine with the network."""
    repo, filename = tag_cfg["hf_hub"].rsplit("/", 1)
    return f"python -c \"from huggingface_hub import hf_hub_download; hf_hub_download('{repo}', '{filename}')\""


def open_clip_layout(state):
    """A state_dict of Chinese-CLIP's layout ("module." already stripped), as open_clip's model of the
    same towers holds it: bert.X is text.transformer.X; text_projection [width, embed_dim], applied as
    x @ P, is the weight of a Linear, [embed_dim, width], hence transposed; BERT's pooler, which
    Chinese-CLIP never uses (it pools [CLS] itself) and open_clip does not build, is dropped; fp16
    tensors become fp32, as the model trains. The image tower's and the temperature's names are
    the same in both. Any other state_dict is returned as it is: Chinese-CLIP's layout is the one
    with a text tower under "bert.", which no open_clip model has."""
    if not any(name.startswith("bert.") for name in state):
        return state
    converted = {}
    for name, tensor in state.items():
        if name.startswith("bert.pooler."):
            continue
        if name.startswith("bert."):
            name = "text.transformer." + name[len("bert."):]
        elif name == "text_projection":
            name, tensor = "text.proj.weight", tensor.T.contiguous()
        converted[name] = tensor.float() if tensor.is_floating_point() else tensor
    return converted


def tokenize_raw_text(tokenizer):
    """open_clip's Hugging Face tokenizer, made to tokenize a text as cn_clip does. open_clip cleans
    each text before BERT sees it (ftfy and HTML unescaping: the full-width "，" and "！" of Chinese
    become "," and "!", "&amp;" becomes "&"); cn_clip does not, and Chinese-CLIP's weights learnt
    from its tokens. BERT's own normalisation (lower case, accents, spaces, control characters) is
    in the tokenizer's files. clean_fn is the attribute open_clip's HFTokenizer calls on each text."""
    tokenizer.clean_fn = str
    return tokenizer

