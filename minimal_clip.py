"""CLIP written out in one file: the two towers, the loss, a training loop, recall and zero-shot.

    python minimal_clip.py            # trains on generated shapes in about two minutes on a CPU

CLIP (Radford et al. 2021) learns from pictures and the captions people wrote for them. An image
tower f and a text tower g map an image and a caption into one D-dimensional space; training
pulls each image towards its own caption and away from the other captions of its batch. Once
trained, any text can be compared with any image: search is a nearest-neighbour lookup, and
zero-shot classification is search among sentences made from class names.

Read this file top to bottom: the model (sections 1-3), the loss (4), the data and the training
loop (5-6), what a trained model can do (7), and where it looks in a picture (8). Section 9 loads
open_clip's weights into the model written here; tests/test_minimal_clip.py uses it to prove that
this file computes what open_clip computes, to float32 round-off, so the teaching cannot drift
from the library. The list at the end names what this file leaves out and where the real system
(train.py and the modules it uses) does each.
"""
import argparse
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip  # for its tokenizer only: byte-pair encoding is not an idea of CLIP's
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import sample_data

# ---------------------------------------------------------------------------------------------
# 1. Settings: the tiny-vit-64 preset of model_configs/, small enough to train on a CPU.

@dataclass
class Config:
    embed_dim: int = 128          # D, the size of the shared space
    image_size: int = 64
    patch_size: int = 8           # the image is read as (64/8)^2 = 64 patches
    vision_width: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    context_length: int = 32      # tokens a caption is cut or padded to
    vocab_size: int = 49408       # CLIP's byte-pair vocabulary
    text_width: int = 128
    text_layers: int = 4
    text_heads: int = 4
    quick_gelu: bool = False      # OpenAI's released weights were trained with QuickGELU


# ---------------------------------------------------------------------------------------------
# 2. The Transformer that both towers are made of

class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): OpenAI's cheap approximation of GELU. A model must be run with the
    activation it was trained with; the two differ by up to 0.02 per unit."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention: softmax(Q K^T / sqrt(d) + mask) V in each of h heads.

    Every token sends a query q and offers a key k and a value v; a token's output is the mean
    of all values weighted by how well its query matches their keys. Dividing by sqrt(d) keeps
    the scores' spread independent of the head size d, so the softmax does not saturate. The
    weights of the last call are kept in `self.weights`: section 8 reads them.
    """

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)   # Q, K and V of all heads in one matrix
        self.out = nn.Linear(width, width)
        self.weights = None

    def forward(self, x, mask=None):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, h, N, N)
        if mask is not None:
            scores = scores + mask                 # -inf where a token may not look
        self.weights = scores.softmax(dim=-1)      # (B, h, N, N), each row sums to 1
        x = self.weights @ v                       # (B, h, N, d)
        return self.out(x.transpose(1, 2).reshape(B, N, C))  # heads side by side: (B, N, C)


class Block(nn.Module):
    """Pre-norm residual block: x + attention(norm(x)), then x + MLP(norm(x)). Normalising the
    input of each branch, not the sum, keeps the residual path an identity that gradients
    flow through unchanged, which is what lets deep stacks train."""

    def __init__(self, width, heads, activation):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(width), Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), activation(), nn.Linear(4 * width, width))

    def forward(self, x, mask=None):
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


# ---------------------------------------------------------------------------------------------
# 3. The two towers and the shared space

class ImageTower(nn.Module):
    """Vision Transformer (Dosovitskiy et al. 2021): the image as a sequence of patches.

    A strided convolution is one linear map applied to each p x p patch. A learned class token
    goes first; after the blocks it has gathered what the image shows, and its final state,
    projected to D, is the image's embedding. Positions are learned vectors added to the tokens:
    attention itself does not know where a token came from.
    """

    def __init__(self, cfg, activation):
        super().__init__()
        width, patches = cfg.vision_width, (cfg.image_size // cfg.patch_size) ** 2
        self.patchify = nn.Conv2d(3, width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_token = nn.Parameter(width ** -0.5 * torch.randn(width))
        self.positions = nn.Parameter(width ** -0.5 * torch.randn(1 + patches, width))
        self.norm_pre = nn.LayerNorm(width)
        self.blocks = nn.ModuleList(Block(width, cfg.vision_heads, activation)
                                    for _ in range(cfg.vision_layers))
        self.norm_post = nn.LayerNorm(width)
        self.projection = nn.Parameter(width ** -0.5 * torch.randn(width, cfg.embed_dim))

    def forward(self, images):                                    # (B, 3, H, W)
        x = self.patchify(images).flatten(2).transpose(1, 2)      # (B, N, width), N = HW / p^2
        x = torch.cat([self.class_token.expand(len(x), 1, -1), x], dim=1) + self.positions
        x = self.norm_pre(x)                                      # (B, 1 + N, width)
        for block in self.blocks:
            x = block(x)
        return self.norm_post(x[:, 0]) @ self.projection         # class token: (B, D)


class TextTower(nn.Module):
    """A Transformer over the caption's tokens, read at its end-of-text token.

    The causal mask lets token t see tokens 1..t only (CLIP's text tower was built to allow
    language modelling too), so the end-of-text token is the one that has seen the whole caption.
    It has the highest id in CLIP's vocabulary, so argmax finds it in every row.
    """

    def __init__(self, cfg, activation):
        super().__init__()
        width = cfg.text_width
        self.tokens = nn.Embedding(cfg.vocab_size, width)
        self.positions = nn.Parameter(0.01 * torch.randn(cfg.context_length, width))
        self.blocks = nn.ModuleList(Block(width, cfg.text_heads, activation)
                                    for _ in range(cfg.text_layers))
        self.norm_post = nn.LayerNorm(width)
        self.projection = nn.Parameter(width ** -0.5 * torch.randn(width, cfg.embed_dim))
        causal = torch.full((cfg.context_length, cfg.context_length), float("-inf")).triu(1)
        self.register_buffer("causal_mask", causal, persistent=False)
        nn.init.normal_(self.tokens.weight, std=0.02)

    def forward(self, tokens):                                    # (B, L) token ids
        x = self.tokens(tokens) + self.positions                  # (B, L, width)
        for block in self.blocks:
            x = block(x, self.causal_mask)
        x = self.norm_post(x)
        end_of_text = tokens.argmax(dim=-1)                       # (B,)
        return x[torch.arange(len(x)), end_of_text] @ self.projection  # (B, D)


MAX_LOGIT_SCALE = 100.0


class CLIP(nn.Module):
    """Two towers into one space, and the temperature of their comparison.

    Both embeddings are L2-normalised: x . y is then the cosine of the angle between them, a
    number in [-1, 1] that ignores how long a vector grew, so only directions carry meaning.
    Cosines are too flat for a softmax, so they are multiplied by a learned logit scale
    s = exp(t) = 1 / temperature. t is learned (an unconstrained number, where s must stay
    positive), starts at s = 1/0.07 and is clamped at s = 100 after each step: beyond that the
    softmax is nearly one-hot and training turns unstable (CLIP paper, section 2.5).
    """

    def __init__(self, cfg=Config()):
        super().__init__()
        activation = QuickGELU if cfg.quick_gelu else nn.GELU
        self.cfg = cfg
        self.image_tower = ImageTower(cfg, activation)
        self.text_tower = TextTower(cfg, activation)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # t

    def encode_image(self, images):
        return F.normalize(self.image_tower(images), dim=-1)     # x: (B, D), |x| = 1

    def encode_text(self, tokens):
        return F.normalize(self.text_tower(tokens), dim=-1)      # y: (B, D), |y| = 1

    def forward(self, images, tokens):
        return self.encode_image(images), self.encode_text(tokens), self.logit_scale.exp()


# ---------------------------------------------------------------------------------------------
# 4. The contrastive loss

def clip_loss(x, y, s):
    r"""Symmetric InfoNCE. With L_ij = s * x_i . y_j for a batch of B pairs (x_i, y_i):

        loss = ( CE(L, diag) + CE(L^T, diag) ) / 2

    The first cross-entropy asks each image to pick its caption among the B captions of the
    batch, the second each caption its image. The other B - 1 pairs are the negatives, which is
    why CLIP wants large batches; a loss stuck at ln(B) means the pairs are not told apart yet.
    """
    L = s * x @ y.T                                               # (B, B) logits
    diag = torch.arange(len(L), device=L.device)                  # pair i is row i, column i
    return (F.cross_entropy(L, diag) + F.cross_entropy(L.T, diag)) / 2


# ---------------------------------------------------------------------------------------------
# 5. Data: generated pictures of coloured shapes, each with two or three captions

# CLIP's images are normalised by the mean and std of its training set, per colour channel.
MEAN, STD = torch.tensor(open_clip.OPENAI_DATASET_MEAN), torch.tensor(open_clip.OPENAI_DATASET_STD)


def image_tensor(image, size):
    """A PIL image as the towers' input: RGB, size x size, normalised. (3, size, size)"""
    image = image.convert("RGB").resize((size, size), Image.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
    return (pixels - MEAN[:, None, None]) / STD[:, None, None]


def load_pairs(folder, cfg, tokenizer):
    """All images of a generated set as one tensor, every caption tokenised, and the image of
    each caption (owner). The set is small, so it is read once into memory. Images are not
    augmented: the captions name colours and positions that a flip or a colour change would
    make false."""
    entries = json.loads((Path(folder) / "data.json").read_text())
    images = torch.stack([image_tensor(Image.open(Path(folder) / e["image_path"]), cfg.image_size)
                          for e in entries])                      # (N, 3, H, W)
    captions = [caption for e in entries for caption in e["captions"]]
    owner = torch.tensor([i for i, e in enumerate(entries) for _ in e["captions"]])
    return images, tokenizer(captions), owner


# ---------------------------------------------------------------------------------------------
# 6. Training: a plain loop of data, forward, loss, backward and an AdamW step

def learning_rate(step, total, peak, warmup):
    """Linear warm-up (Adam's early steps rest on poor moment estimates), then a cosine decay."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train(model, images, tokens, owner, epochs=10, batch_size=64, peak_lr=1e-3, warmup=50,
          weight_decay=0.1, seed=0):
    """Each epoch shows every caption once, with its image, in a random order of batches."""
    generator = torch.Generator().manual_seed(seed)
    # Decay matrices only: a LayerNorm gain or a bias decayed to zero switches its unit off.
    decayed = [p for p in model.parameters() if p.ndim >= 2]
    others = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decayed, "weight_decay": weight_decay},
                                   {"params": others, "weight_decay": 0.0}], betas=(0.9, 0.98))
    steps_per_epoch = len(tokens) // batch_size
    total, step = epochs * steps_per_epoch, 0
    for epoch in range(epochs):
        order = torch.randperm(len(tokens), generator=generator)
        for b in range(steps_per_epoch):
            captions = order[b * batch_size:(b + 1) * batch_size]
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, total, peak_lr, warmup)
            x, y, s = model(images[owner[captions]], tokens[captions])
            # Two captions of one image in a batch would be each other's negatives: rare here
            # (the production loss, clip_model.ContrastiveLoss, makes them both positives).
            loss = clip_loss(x, y, s)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(max=math.log(MAX_LOGIT_SCALE))
            step += 1
            if step % 50 == 0 or step == total:
                print(f"epoch {epoch + 1}/{epochs}  step {step}/{total}  loss {loss.item():.3f}  "
                      f"logit scale {s.item():.1f}")
    return model


# ---------------------------------------------------------------------------------------------
# 7. What a trained model can do: retrieval and zero-shot classification

@torch.no_grad()
def recall_at_k(image_features, text_features, ks=(1, 5, 10)):
    """Recall@K in percent, both ways, when caption i describes image i.

    Every caption searches all images (text -> image) and every image all captions (image ->
    text), by cosine similarity. The rank of a query is 1 + the number of candidates that score
    higher than its right answer; R@K is the share of queries with rank <= K.
    """
    scores = image_features @ text_features.T                    # (N images, N captions)
    right = scores.diagonal()
    image_rank = 1 + (scores > right[:, None]).sum(dim=1)        # each image's caption, in its row
    text_rank = 1 + (scores > right[None, :]).sum(dim=0)         # each caption's image, in its column
    return {"image_to_text": {f"R@{k}": 100.0 * (image_rank <= k).float().mean().item() for k in ks},
            "text_to_image": {f"R@{k}": 100.0 * (text_rank <= k).float().mean().item() for k in ks}}


PROMPTS = ["a photo of a {}.", "a picture of a {}.", "a drawing of a {}."]


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, folder, cfg):
    """Top-1 accuracy (percent) of classifying the images of folder/<class>/ by their class names.

    No classifier is trained: the text tower writes one, a vector per class, from sentences
    that name the class (the mean of several prompts beats any single one, CLIP paper 3.1.4).
    An image goes to the class whose vector is most similar to it.
    """
    classes = sorted(p.name for p in Path(folder).iterdir() if p.is_dir())
    prompts = tokenizer([prompt.format(name) for name in classes for prompt in PROMPTS])
    text = model.encode_text(prompts).view(len(classes), len(PROMPTS), -1)
    class_vectors = F.normalize(text.mean(dim=1), dim=-1)        # (C, D)
    correct = total = 0
    for label, name in enumerate(classes):
        files = sorted((Path(folder) / name).glob("*.png"))
        images = torch.stack([image_tensor(Image.open(f), cfg.image_size) for f in files])
        predicted = (model.encode_image(images) @ class_vectors.T).argmax(dim=1)
        correct, total = correct + (predicted == label).sum().item(), total + len(files)
    return 100.0 * correct / total


# ---------------------------------------------------------------------------------------------
# 8. Where the model looks: gradient-weighted attention relevance (Chefer et al. 2021)

def relevance_map(model, image, tokens):
    """How much each patch of `image` (3, H, W) contributed to its similarity with a caption
    (`tokens`, (L,)): a (H/p, W/p) map that sums to about 1.

    Attention weights alone show where information flowed, not whether it raised the score.
    Chefer et al. weight each layer's attention A by its gradient, keep the positive part and
    average the heads: A' = mean_h (dscore/dA * A)^+. Relevance starts as the identity (each
    token is itself) and flows through the residual blocks as R <- R + A' R. The class token's
    row of R, over the patches, says which patches made the embedding match the caption.
    """
    with torch.enable_grad():
        score = (model.encode_image(image[None]) * model.encode_text(tokens[None])).sum()
        weights = [block.attn.weights for block in model.image_tower.blocks]
        grads = torch.autograd.grad(score, weights)
    R = torch.eye(weights[0].shape[-1])                           # (1 + N, 1 + N)
    for A, dA in zip(weights, grads):
        R = R + (dA * A).clamp(min=0).mean(dim=1)[0] @ R
    patches = R[0, 1:]
    side = int(math.isqrt(len(patches)))
    return (patches / patches.sum().clamp(min=1e-12)).view(side, side).detach()


# ---------------------------------------------------------------------------------------------
# 9. open_clip's weights in this model: the proof that the model above is CLIP

# open_clip's parameter names -> ours, applied in order (the architecture is the same).
OPEN_CLIP_NAMES = [
    (r"^visual\.conv1\.", "image_tower.patchify."), (r"^visual\.class_embedding$", "image_tower.class_token"),
    (r"^visual\.positional_embedding$", "image_tower.positions"), (r"^visual\.ln_pre\.", "image_tower.norm_pre."),
    (r"^visual\.ln_post\.", "image_tower.norm_post."), (r"^visual\.proj$", "image_tower.projection"),
    (r"^visual\.transformer\.resblocks\.", "image_tower.blocks."),
    (r"^transformer\.resblocks\.", "text_tower.blocks."), (r"^token_embedding\.", "text_tower.tokens."),
    (r"^positional_embedding$", "text_tower.positions"), (r"^ln_final\.", "text_tower.norm_post."),
    (r"^text_projection$", "text_tower.projection"),
    (r"\.ln_(\d)\.", r".norm\1."), (r"\.attn\.in_proj_", ".attn.qkv."), (r"\.attn\.out_proj\.", ".attn.out."),
    (r"\.mlp\.c_fc\.", ".mlp.0."), (r"\.mlp\.c_proj\.", ".mlp.2."),
]


def config_from_open_clip(model_config):
    """Our Config for an open_clip model config of a plain ViT and text Transformer."""
    vision, text = model_config["vision_cfg"], model_config["text_cfg"]
    extras = set(vision) - {"image_size", "patch_size", "width", "layers", "head_width", "mlp_ratio"}
    extras |= set(text) - {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
    if extras or vision.get("mlp_ratio", 4.0) != 4.0 or text.get("mlp_ratio", 4.0) != 4.0:
        raise ValueError("minimal_clip writes out CLIP's plain ViT and text Transformer only; this "
                         f"model has other settings ({', '.join(sorted(extras)) or 'mlp_ratio'})")
    return Config(embed_dim=model_config["embed_dim"], image_size=vision["image_size"],
                  patch_size=vision["patch_size"], vision_width=vision["width"],
                  vision_layers=vision["layers"],
                  vision_heads=vision["width"] // vision.get("head_width", 64),
                  context_length=text["context_length"], vocab_size=text["vocab_size"],
                  text_width=text["width"], text_layers=text["layers"], text_heads=text["heads"],
                  quick_gelu=bool(model_config.get("quick_gelu", False)))


def from_open_clip(state_dict, model_config):
    """This file's CLIP holding the weights of an open_clip model (`model.state_dict()` and its
    config, as clip_model.build_model or a checkpoint of ours gives them)."""
    model = CLIP(config_from_open_clip(model_config))
    renamed = {}
    for name, tensor in state_dict.items():
        if name == "logit_bias":   # SigLIP's bias moves every logit alike; features do not use it
            continue
        for pattern, replacement in OPEN_CLIP_NAMES:
            name = re.sub(pattern, replacement, name)
        renamed[name] = tensor
    model.load_state_dict(renamed)       # strict: a weight left over or missing is an error
    return model.eval()


# ---------------------------------------------------------------------------------------------
# The whole idea, run

def build_parser():
    parser = argparse.ArgumentParser(description="Train the CLIP written out in minimal_clip.py "
                                     "on generated shapes, then measure recall and zero-shot.")
    parser.add_argument("--data", default="data/minimal-clip", help="where the generated data "
                        "goes (made on the first run)")
    parser.add_argument("--epochs", type=int, default=4, help="passes over the captions")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and batches")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    started, cfg = time.time(), Config()
    tokenizer = open_clip.get_tokenizer("RN50", context_length=cfg.context_length)
    for split, count, seed in (("train", 2000, 0), ("val", 200, 1)):
        if not (Path(args.data) / split / "data.json").is_file():
            sample_data.create_sample_dataset(Path(args.data) / split, count, seed=seed)
    images, tokens, owner = load_pairs(Path(args.data) / "train", cfg, tokenizer)
    model = train(CLIP(cfg), images, tokens, owner, epochs=args.epochs, seed=args.seed)

    model.eval()
    val_images, val_tokens, val_owner = load_pairs(Path(args.data) / "val", cfg, tokenizer)
    first = torch.searchsorted(val_owner, torch.arange(len(val_images)))  # first caption of each
    with torch.no_grad():
        recall = recall_at_k(model.encode_image(val_images), model.encode_text(val_tokens[first]))
    accuracy = zero_shot_accuracy(model, tokenizer, Path(args.data) / "val" / "zeroshot", cfg)
    classes = sum(1 for p in (Path(args.data) / "val" / "zeroshot").iterdir())
    print(f"\nheld-out recall, {len(val_images)} images (chance R@1 {100 / len(val_images):.1f}):")
    for direction, values in recall.items():
        print(f"  {direction}: " + "  ".join(f"{k} {v:.1f}" for k, v in values.items()))
    print(f"zero-shot top-1 over {classes} classes: {accuracy:.1f} (chance {100 / classes:.1f})")
    print(f"({time.time() - started:.0f} s)")
    return {"recall": recall, "zero_shot": accuracy, "model": model}


# What this file leaves out on purpose, and where the real system does it:
#   towers of every open_clip architecture, pretrained weights    clip_model.build_model
#   two captions of one image in a batch as positives, SigLIP    clip_model.ContrastiveLoss, SigLipLoss
#   large batches on small memory (cached-feature accumulation)  train_step.cached_backward
#   many GPUs: features gathered with gradient, torchrun         clip_model.gather_features
#   mixed precision (AMP, bf16), gradient clipping               train_step.optimizer_step
#   augmentation, every data format, unreadable images           augmentation.TrainAugmentation, data_loader
#   data sets larger than memory, cached decoded images          shards.py, data_loader.cache_images
#   resume, checkpoints that survive kill -9, stop signals       train.resume, clip_model.save_checkpoint,
#                                                                runtime.StopRequest
#   validation, best checkpoint, TensorBoard                     train.validate, tensorboard_views.py
#   recall with many captions per image, ties, any scale         evaluation.retrieval_metrics
#   zero-shot with open_clip's prompt sets, Chinese prompts      evaluation.evaluate_zeroshot
if __name__ == "__main__":
    main()
