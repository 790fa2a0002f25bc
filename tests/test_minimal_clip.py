"""minimal_clip.py computes what open_clip and the production code compute, and it learns."""
import io

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clip_model
import evaluation
import minimal_clip as mc
import sample_data

# Float32 round-off of a forward pass through a dozen blocks; reached: at most 1.3e-7 (all four
# architectures). GELU run where QuickGELU was trained differs by 1e-3 to 4e-3.
TOLERANCE = 1e-5


def open_clip_model(name, quick_gelu=False):
    """An open_clip model with random weights (nothing can be downloaded here), and its config."""
    torch.manual_seed(0)
    config = clip_model.build_model(name).model_config
    if quick_gelu:
        config = {**config, "quick_gelu": True}
    setup = clip_model.build_model(name, model_config=config,
                                   preprocess_cfg={"size": config["vision_cfg"]["image_size"]})
    return setup, config


def features(name, quick_gelu, written_out_config=None):
    """(open_clip's, ours) image and text features of the same inputs, open_clip's weights."""
    setup, config = open_clip_model(name, quick_gelu)
    ours = mc.from_open_clip(setup.model.state_dict(), written_out_config or config)
    size = config["vision_cfg"]["image_size"]
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    tokens = setup.tokenizer(["a red circle on the left", "two shapes", "一只猫"])
    with torch.no_grad():
        theirs = (setup.model.eval().encode_image(images, normalize=True),
                  setup.model.encode_text(tokens, normalize=True))
        mine = ours.encode_image(images), ours.encode_text(tokens)
    return theirs, mine


@pytest.mark.parametrize("name,quick_gelu", [("tiny-vit-64", False), ("tiny-vit-64", True),
                                             ("ViT-B-32", True)])
@pytest.mark.slow
def test_features_equal_open_clip_to_float32_round_off(name, quick_gelu):
    (image_theirs, text_theirs), (image_mine, text_mine) = features(name, quick_gelu)
    assert (image_mine - image_theirs).abs().max() < TOLERANCE
    assert (text_mine - text_theirs).abs().max() < TOLERANCE


@pytest.mark.slow
def test_features_equal_open_clip_for_vit_b_16():
    (image_theirs, text_theirs), (image_mine, text_mine) = features("ViT-B-16", False)
    assert (image_mine - image_theirs).abs().max() < TOLERANCE
    assert (text_mine - text_theirs).abs().max() < TOLERANCE


def test_the_equality_check_sees_the_wrong_activation():
    # QuickGELU weights run with GELU: what the equality test exists to catch.
    _, config = open_clip_model("tiny-vit-64", quick_gelu=True)
    (image_theirs, text_theirs), (image_mine, text_mine) = features(
        "tiny-vit-64", True, written_out_config={**config, "quick_gelu": False})
    assert (image_mine - image_theirs).abs().max() > 100 * TOLERANCE
    assert (text_mine - text_theirs).abs().max() > 100 * TOLERANCE


def test_weights_of_another_architecture_are_refused():
    setup, config = open_clip_model("tiny-vit-64")
    with pytest.raises(RuntimeError, match="size mismatch"):
        mc.from_open_clip(setup.model.state_dict(), {**config, "embed_dim": 64})
    with pytest.raises(ValueError, match="plain ViT"):
        mc.config_from_open_clip(clip_model.build_model("simple-rn18").model_config)


def test_loss_equals_the_production_contrastive_loss():
    g = torch.Generator().manual_seed(2)
    x, y = F.normalize(torch.randn(16, 8, generator=g), dim=-1), F.normalize(torch.randn(16, 8, generator=g), dim=-1)
    s = torch.tensor(14.3)
    production = clip_model.ContrastiveLoss()(x, y, s, torch.arange(16))
    assert mc.clip_loss(x, y, s).item() == pytest.approx(production.item(), rel=1e-6)


def test_recall_equals_the_production_retrieval_metrics():
    g = torch.Generator().manual_seed(3)
    images = F.normalize(torch.randn(60, 4, generator=g), dim=-1)
    texts = F.normalize(images + 0.8 * torch.randn(60, 4, generator=g), dim=-1)  # partly right
    ours = mc.recall_at_k(images, texts)
    production = evaluation.retrieval_metrics(images, texts, np.arange(60))
    for direction in ("image_to_text", "text_to_image"):
        for k in ("R@1", "R@5", "R@10"):
            assert ours[direction][k] == pytest.approx(production[direction][k])
    assert 0 < ours["text_to_image"]["R@1"] < 100   # neither trivial nor hopeless


def test_schedule_warms_up_then_decays_to_zero():
    rates = [mc.learning_rate(step, 100, 1.0, 10) for step in range(101)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert rates[55] == pytest.approx(0.5) and rates[100] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:]))


# ---- the whole idea, run ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """python minimal_clip.py with fewer epochs: under a minute on two cores (its recall is
    ~50x chance after two epochs; the thresholds below leave room for other seeds and machines)."""
    data = tmp_path_factory.mktemp("minimal")
    return mc.main(["--data", str(data), "--epochs", "2"]), data


@pytest.mark.slow
def test_the_written_out_model_learns_far_above_chance(trained):
    result, _ = trained
    assert result["recall"]["text_to_image"]["R@1"] > 10 * 0.5   # 200 images: chance 0.5
    assert result["recall"]["image_to_text"]["R@5"] > 50
    assert result["zero_shot"] > 5 * 5.0                         # 20 classes: chance 5


def two_shapes(seed):
    """A generated picture of two shapes of different colours, side by side or one above the
    other, with the pixels of each shape (where its colour is painted) and a caption for each."""
    rng = np.random.default_rng(seed)
    colours, kinds = list(sample_data.SAMPLE_COLOURS), list(sample_data.SAMPLE_SHAPES)
    first, second = rng.choice(len(colours), 2, replace=False)
    positions = (("left", "right"), ("top", "bottom"))[seed % 2]
    shapes = [(colours[c], kinds[rng.integers(len(kinds))], p, "pair")
              for c, p in zip((first, second), positions)]
    image = Image.open(io.BytesIO(sample_data._sample_image(rng, shapes))).convert("RGB")
    pixels = np.asarray(image, dtype=np.int32)
    masks = [np.abs(pixels - sample_data.SAMPLE_COLOURS[colour][0]).max(axis=-1) < 40
             for colour, *_ in shapes]
    return image, masks, [f"a {colour} {kind}" for colour, kind, *_ in shapes]


def mass_on(relevance, mask):
    """Share of the relevance on the patches that the mask touches."""
    rows, cols = relevance.shape
    touched = mask.reshape(rows, mask.shape[0] // rows, cols, mask.shape[1] // cols).any(axis=(1, 3))
    return float(relevance.numpy()[touched].sum())


@pytest.mark.slow
def test_the_relevance_map_puts_most_of_its_mass_on_the_shape_the_caption_names(trained):
    model = trained[0]["model"]
    tokenizer = open_clip.get_tokenizer("RN50", context_length=model.cfg.context_length)
    on_named, on_other = [], []
    for seed in range(20):
        image, masks, captions = two_shapes(seed)
        for named in (0, 1):
            relevance = mc.relevance_map(model, mc.image_tensor(image, 64), tokenizer(captions[named])[0])
            assert relevance.sum().item() == pytest.approx(1.0, abs=1e-5)
            on_named.append(mass_on(relevance, masks[named]))
            on_other.append(mass_on(relevance, masks[1 - named]))
    on_named, on_other = np.array(on_named), np.array(on_other)
    # Each shape covers about a tenth of the patches; a model that did not look would spread evenly.
    assert on_named.mean() > 0.5 and on_named.mean() > 3 * on_other.mean()
    assert (on_named > on_other).mean() >= 0.9
