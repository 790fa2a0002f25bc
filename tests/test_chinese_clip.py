"""Chinese-CLIP's models (chinese_clip.py), against Chinese-CLIP's own package, cn_clip 1.6.0 (the
reference; setup.sh installs it without its dependencies, and the comparisons skip without it):
each architecture holds cn_clip's tensors, a checkpoint as Chinese-CLIP releases it gives cn_clip's
features, the tokenizer gives cn_clip's tokens. A cn-clip model trains, rebuilds from its
checkpoint, evaluates and exports without the network; LiT locks what it says; names, tags and
weights that do not fit are refused in one line, and the released weights fail fast offline."""
import contextlib
import copy
import dataclasses
import io
import json
import shutil
import time
from pathlib import Path

import open_clip
import pytest
import torch

import chinese_clip
import clip_model as cm
import export
import sample_data
import wise_ft
from errors import ModelError
from text_tower_runs import evaluate_and_export, features, train_one_step

RELEASED = [chinese_clip.PREFIX + name for name in chinese_clip.RELEASED]
CAPTIONS = ["一只红色的圆形在左边，蓝色的方块在右边。", "左边有一个红色的圆形", "A Photo of TWO Cats",
            "Café naïve RÉSUMÉ Ærø", "“引号”、（括号）！？ＡＢＣ１２３ &amp; <b>", ""]
# What a tokenizer can get wrong: open_clip's cleaning (full-width forms, curly quotes, HTML, ligatures),
# BERT's normalisation (case, accents, spaces, control characters), special tokens written as text,
# truncation to 50 tokens, and WordPiece's longest word (cn_clip: 200 characters, transformers: 100).
TEXTS = [*CAPTIONS, "  多个   空格\t和\n换行\x00 ", "[CLS] [SEP] [PAD] [MASK] [UNK] [unused1]",
         "我爱北京天安门 I love Beijing, 2024年！", "emoji 😀, ½ and the ﬁ ligature", "长" * 60,
         "the " * 60, "a" * 150, "b" * 250, "deoxyribonucleic-acid's 3.14159 #hashtag @user"]


@pytest.fixture(scope="module")
def cn_clip():
    return pytest.importorskip("cn_clip.clip")


def cn_clip_model(cn_clip, model_name):
    """cn_clip's CLIP of a cn-clip name's towers, as its create_model makes it (fp16 but for the
    norms), with random weights of seed 0, BatchNorm's random too: at their initial values (scale 1
    or 0, statistics 0 and 1) a ResNet's tensors could be swapped unseen."""
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):      # it prints its configs
        model = cn_clip.utils.create_model("@".join(chinese_clip.towers(model_name)))
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.1)
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def save_as_released(state, path):
    """Weights (a state_dict of cn_clip's CLIP) as Chinese-CLIP releases them: its training's
    checkpoint of a DistributedDataParallel model, "module." before every name."""
    state = {f"module.{name}": tensor for name, tensor in state.items()}
    torch.save({"epoch": 3, "step": 1000, "name": "test", "state_dict": state,
                "optimizer": {"state": {}, "param_groups": [{"lr": 5e-5, "params": [0]}]}}, path)
    return path


def meta_model(model_name):
    """Our model of a cn-clip name on PyTorch's meta device (shapes without memory or time:
    ViT-H-14's has 958M parameters), built by open_clip from chinese_clip.architecture's config."""
    config, _, _ = chinese_clip.architecture(model_name)
    text_cfg = {**config["text_cfg"], "hf_model_pretrained": False,
                "hf_model_name": str(chinese_clip.FILES / chinese_clip.towers(model_name)[1])}
    with torch.device("meta"):
        return open_clip.CustomTextCLIP(config["embed_dim"], config["vision_cfg"], text_cfg, quick_gelu=True)


@pytest.mark.parametrize("model_name", [*RELEASED, "cn-clip:ViT-B-32@RBT3-chinese"])
def test_each_architecture_holds_cn_clips_tensors(cn_clip, model_name):
    with torch.device("meta"), contextlib.redirect_stdout(io.StringIO()):
        theirs = cn_clip.utils.create_model("@".join(chinese_clip.towers(model_name)))
    expected = {name: tensor.shape for name, tensor in chinese_clip.open_clip_layout(theirs.state_dict()).items()}
    assert {name: tensor.shape for name, tensor in meta_model(model_name).state_dict().items()} == expected


def raw_features(model, images, tokens):
    """A model's image and text features, not normalised: the stricter comparison."""
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


def assert_cn_clips_features(setup, reference, cn_clip):
    tokens = cn_clip.tokenize(CAPTIONS)
    assert torch.equal(setup.tokenizer(CAPTIONS), tokens)
    size = setup.model_config["vision_cfg"]["image_size"]
    images = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    expected = raw_features(reference.float(), images, tokens)
    for ours, theirs in zip(raw_features(setup.model.eval(), images, tokens), expected):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def released_rn50(cn_clip, tmp_path_factory):
    """cn_clip's RN50 and its weights as Chinese-CLIP releases them, in fp16 and in fp32."""
    folder = tmp_path_factory.mktemp("released")
    model = cn_clip_model(cn_clip, "cn-clip:RN50")
    files = {"fp16": save_as_released(model.state_dict(), folder / "fp16.pt")}
    files["fp32"] = save_as_released(model.float().state_dict(), folder / "fp32.pt")
    return model, files


def test_a_released_checkpoint_gives_cn_clips_features(released_rn50, cn_clip):
    reference, files = released_rn50
    assert all(name.startswith("module.") for name in torch.load(files["fp16"])["state_dict"])
    assert_cn_clips_features(cm.build_model("cn-clip:RN50", pretrained=str(files["fp16"])), reference, cn_clip)


def test_a_released_checkpoint_in_fp32_reads_as_in_fp16(released_rn50):
    # the same values in both files (the fp32 one is the fp16 model made float): the same weights here
    (half, _), (full, _) = (cm.read_weights(released_rn50[1][precision]) for precision in ("fp16", "fp32"))
    assert half.keys() == full.keys() and "text.proj.weight" in half and not any(k.startswith("bert.") for k in half)
    for name, tensor in half.items():
        assert tensor.dtype == full[name].dtype != torch.float16 and torch.equal(tensor, full[name])


@pytest.mark.slow
def test_a_released_vit_checkpoint_gives_cn_clips_features(cn_clip, tmp_path):
    reference = cn_clip_model(cn_clip, "cn-clip:ViT-B-16")
    path = save_as_released(reference.state_dict(), tmp_path / "vit.pt")
    assert_cn_clips_features(cm.build_model("cn-clip:ViT-B-16", pretrained=str(path)), reference, cn_clip)


def test_weights_of_other_towers_are_refused_in_one_line(released_rn50, tmp_path):
    checkpoint = torch.load(released_rn50[1]["fp32"])
    del checkpoint["state_dict"]["module.text_projection"]
    torch.save(checkpoint, tmp_path / "partial.pt")
    message = (rf"--pretrained {tmp_path}/partial.pt holds weights of another architecture, not cn-clip:RN50: 1 "
               rf"tensors missing, 0 unexpected, 0 of another shape \('text.proj.weight' is missing\)")
    with pytest.raises(cm.CheckpointError, match=message) as refused:
        cm.build_model("cn-clip:RN50", pretrained=str(tmp_path / "partial.pt"))
    assert "\n" not in str(refused.value)


@pytest.fixture(scope="module")
def rn50():
    return cm.build_model("cn-clip:RN50")


def test_the_rn50_trains_a_step_and_rebuilds_from_its_checkpoint(rn50, tmp_path):
    # The smallest released architecture at its own size (77M parameters, 224 px): a step moves both
    # towers, and the checkpoint rebuilds the model that took it. The tiny pairing below goes through
    # train.py, evaluation and export at a tenth of the cost.
    setup = dataclasses.replace(rn50, model=copy.deepcopy(rn50.model).train())
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    tokens = setup.tokenizer(CAPTIONS[:2])
    before = {name: tensor.clone() for name, tensor in setup.model.state_dict().items()}
    out = setup.model(images, tokens)
    cm.ContrastiveLoss()(out["image_features"], out["text_features"], out["logit_scale"], torch.arange(2)).backward()
    torch.optim.AdamW(setup.model.parameters(), lr=1e-4).step()
    moved = {name.split(".")[0] for name, tensor in setup.model.state_dict().items()
             if tensor.is_floating_point() and not torch.equal(tensor, before[name])}
    assert {"visual", "text", "logit_scale"} <= moved
    cm.save_checkpoint(tmp_path / "rn50.pt", setup)
    rebuilt, _ = cm.model_from_checkpoint(tmp_path / "rn50.pt")
    with torch.no_grad():
        ours = setup.model.eval().encode_image(images), setup.model.encode_text(tokens)
        theirs = rebuilt.model.eval().encode_image(images), rebuilt.model.encode_text(tokens)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def test_the_tokenizer_gives_cn_clips_tokens(rn50, cn_clip):
    tokens = rn50.tokenizer(TEXTS)
    assert tokens.shape == (len(TEXTS), 52) and rn50.tokenizer.context_length == 52
    assert torch.equal(tokens, cn_clip.tokenize(TEXTS))


def test_a_cn_clip_model_is_chinese_clips_architecture(rn50):
    assert rn50.model_name == "cn-clip:RN50" and isinstance(rn50.model, open_clip.CustomTextCLIP)
    assert {k: rn50.preprocess_cfg[k] for k in ("size", "interpolation", "resize_mode")} == \
        {"size": 224, "interpolation": "bicubic", "resize_mode": "squash"}
    assert tuple(rn50.preprocess_cfg["mean"]) == open_clip.OPENAI_DATASET_MEAN
    assert set(rn50.text_files) == {"config.json", *chinese_clip.TOKENIZER_FILES}     # its checkpoints carry them
    assert json.loads(rn50.text_files["config.json"])["num_hidden_layers"] == 3         # RBT3


def test_an_unknown_pairing_is_refused_with_the_names_it_takes():
    with pytest.raises(ModelError, match=r"cn-clip:ViT-B-16@BERT-base: not a Chinese-CLIP model; use "
                                         r"cn-clip:VISION@TEXT .*, or a released pairing: cn-clip:RN50, "):
        cm.build_model("cn-clip:ViT-B-16@BERT-base")


def test_chinese_clip_is_the_tag_of_the_released_pairings():
    assert cm.resolve_pretrained("cn-clip:ViT-B-16", "")[0] is None
    with pytest.raises(ModelError, match=r"'openai': neither a file nor a pretrained tag of cn-clip:RN50 "
                                         r"\(tags: chinese-clip\)"):
        cm.resolve_pretrained("cn-clip:RN50", "openai")
    with pytest.raises(ModelError, match=r"of cn-clip:ViT-B-16@RBT3-chinese \(tags: none\)"):
        cm.resolve_pretrained("cn-clip:ViT-B-16@RBT3-chinese", "chinese-clip")


@pytest.mark.parametrize("network", ["HF_HUB_OFFLINE", "unreachable"])
def test_the_released_weights_fail_fast_offline_with_the_way_out(monkeypatch, offline, network):
    monkeypatch.setattr(cm, "_cached_hf_file", lambda entry: None)        # whatever this machine's cache holds
    if network == "unreachable":
        monkeypatch.delenv("HF_HUB_OFFLINE")
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")         # no name to resolve: connections refused
    why = "HF_HUB_OFFLINE is set" if network == "HF_HUB_OFFLINE" else "127.0.0.1 cannot be reached from this machine"
    started = time.monotonic()
    with pytest.raises(cm.PretrainedUnavailable) as refused:
        cm.build_model("cn-clip:ViT-B-16", pretrained="chinese-clip")
    assert time.monotonic() - started < 5
    assert str(refused.value) == (
        f"--pretrained chinese-clip: the weights of cn-clip:ViT-B-16/chinese-clip are not in the cache and must be "
        f"downloaded, but {why}. Download them where there is a network (python -c \"from huggingface_hub "
        f"import hf_hub_download; hf_hub_download('OFA-Sys/chinese-clip-vit-base-patch16', 'clip_cn_vit-b-16.pt')\" "
        f"fills the Hugging Face cache), or copy the weights file here and pass its path: "
        f"--pretrained /path/to/clip_cn_vit-b-16.pt")


# ---- a pairing small enough to train here --------------------------------------------------------

TINY = "cn-clip:ViT-T-16@tiny-bert-chinese"


@contextlib.contextmanager
def tiny_pairing(root):
    """Chinese-CLIP's towers with a small pair of their kinds added: a ViT of width 32 on 64 px
    images and a BERT of 2 layers of width 32 that reads Chinese-CLIP's tokenizer, in a folder laid
    out as model_configs/cn-clip (chinese_clip.FILES). The released towers take 20 s a training
    step and write 1 GB of checkpoints on a CPU; they are compared with cn_clip above."""
    files = root / "model_configs" / "cn-clip"
    (files / "tiny-bert-chinese").mkdir(parents=True)
    for name in chinese_clip.TOKENIZER_FILES:
        shutil.copy(chinese_clip.FILES / name, files / name)
    (files / "tiny-bert-chinese" / "config.json").write_text(json.dumps({
        "model_type": "bert", "vocab_size": 21128, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 64, "pad_token_id": 0}))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(chinese_clip, "FILES", files)
        patch.setattr(chinese_clip, "TEXT_TOWERS", (*chinese_clip.TEXT_TOWERS, "tiny-bert-chinese"))
        patch.setitem(chinese_clip.IMAGE_TOWERS, "ViT-T-16",
                      (32, {"image_size": 64, "layers": 2, "width": 32, "patch_size": 16, "head_width": 16}))
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return sample_data.create_sample_dataset(tmp_path_factory.mktemp("data"), num_samples=32, seed=0, language="zh")


@pytest.fixture(scope="module")
def tiny_run(data, tmp_path_factory):
    """A checkpoint of one train.py step of the tiny pairing on Chinese captions, and the features
    of its weights in the model the name builds; then the pairing is gone, as on another machine."""
    out = tmp_path_factory.mktemp("cn")
    with tiny_pairing(out):
        checkpoint = train_one_step(TINY, data["index"], out, "cn")
        reference = cm.build_model(TINY)
        cm.load_weights(reference.model, cm.load_checkpoint(checkpoint)["state_dict"], checkpoint, TINY)
        expected = features(reference, CAPTIONS)
    return {"checkpoint": checkpoint, "features": expected, "out": out}


def test_a_cn_clip_checkpoint_rebuilds_without_the_network(tiny_run, offline):
    checkpoint = cm.load_checkpoint(tiny_run["checkpoint"])
    assert checkpoint["model_name"] == TINY
    assert checkpoint["text_files"]["tokenizer.json"] == (chinese_clip.FILES / "tokenizer.json").read_text()
    rebuilt, _ = cm.model_from_checkpoint(tiny_run["checkpoint"])
    tokens, texts, images = features(rebuilt, CAPTIONS)
    expected_tokens, expected_texts, expected_images = tiny_run["features"]
    assert torch.equal(tokens, expected_tokens) and tokens[0, 11] == 8024      # "，" kept: not open_clip's ","
    torch.testing.assert_close(texts, expected_texts, rtol=0, atol=1e-6)
    torch.testing.assert_close(images, expected_images, rtol=0, atol=1e-6)


def test_a_cn_clip_checkpoint_evaluates_and_exports_without_the_network(tiny_run, data, offline):
    folder = tiny_run["out"] / "export"
    evaluate_and_export(tiny_run["checkpoint"], data, folder)
    assert "clean_fn = str" in json.loads((folder / "onnx_config.json").read_text())["tokenizer"]["call"]
    # the model card's code, run as it stands: open_clip alone builds the model and Chinese-CLIP's tokens
    photo = next((Path(data["index"]).parent / "images").iterdir())
    code = (folder / "README.md").read_text().split("```python\n")[1].split("```")[0]
    card = {}
    exec(code.replace("PATH/TO/THIS/FOLDER", str(folder)).replace("photo.jpg", str(photo)), card)
    assert torch.equal(card["tokenizer"](CAPTIONS), tiny_run["features"][0])
    assert isinstance(card["model"], open_clip.CustomTextCLIP) and card["image"].shape == (1, 3, 64, 64)


def test_wise_ft_starts_from_a_released_checkpoint(tiny_run, tmp_path):
    # the tiny run's weights written back in Chinese-CLIP's layout (fp16, its names, its pooler)
    tuned = cm.load_checkpoint(tiny_run["checkpoint"])["state_dict"]
    released = {("bert." + name[len("text.transformer."):] if name.startswith("text.transformer.") else name):
                tensor.half() for name, tensor in tuned.items() if name != "text.proj.weight"}
    released |= {"text_projection": tuned["text.proj.weight"].T.half(), "bert.pooler.dense.bias": torch.zeros(32)}
    path = save_as_released(released, tmp_path / "released.pt")
    _, start, end = wise_ft.load_endpoints(str(path), tiny_run["checkpoint"], "cpu")
    assert start.keys() == end.keys()
    for name, tensor in start.items():
        torch.testing.assert_close(tensor, end[name].half().float(), rtol=0, atol=0)


def test_the_transformers_export_refuses_a_cn_clip_model_in_one_line(tiny_run, tmp_path):
    with pytest.raises(export.ExportError, match=r"^--transformers: cn-clip:ViT-T-16@tiny-bert-chinese cannot be "
                                                 r"written as transformers' CLIPModel, a Chinese-CLIP model .*"
                                                 r"ChineseCLIPModel") as refused:
        export.main(["--checkpoint", str(tiny_run["checkpoint"]), "--output", str(tmp_path / "out"), "--transformers"])
    assert "\n" not in str(refused.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("lock_image, lock_text", [(0, -1), (1, 1)])
def test_lit_locks_what_it_says_on_a_cn_clip_model(tmp_path, lock_image, lock_text):
    with tiny_pairing(tmp_path):
        model = cm.build_model(TINY).model
    cm.freeze_for_finetuning(model, lock_image=lock_image, lock_text=lock_text)
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    image, text = ({name for name, _ in model.named_parameters() if name.startswith(tower)}
                   for tower in ("visual.", "text."))
    assert "logit_scale" in trainable
    if lock_image == 0:          # LiT: the image tower locked, the text tower trains whole
        assert not trainable & image and text <= trainable
    else:                        # the last block of each tower and what follows it
        assert trainable & image == {name for name in image if name.startswith(
            ("visual.transformer.resblocks.1.", "visual.ln_post.", "visual.proj"))}
        assert trainable & text == {name for name in text if name.startswith(
            ("text.transformer.encoder.layer.1.", "text.proj."))}
