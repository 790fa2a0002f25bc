"""clip_model.py: models, the contrastive losses, fine-tuning controls and checkpoints."""
import json
import math
import sys
import tempfile

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

import clip_model as cm


def random_features(n, d=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return cm.build_model("tiny-vit-64")


def tiny_batch(setup, n=4):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, 64, 64, generator=g)
    texts = setup.tokenizer([f"a photo of shape number {i}" for i in range(n)])
    return images, texts


# ---- losses ------------------------------------------------------------------------------------

def test_clip_loss_equals_float64_reference_computed_by_hand():
    x, y, scale = random_features(5, seed=1), random_features(5, seed=2), torch.tensor(7.5)
    loss = cm.ContrastiveLoss()(x, y, scale, torch.arange(5))
    x64, y64 = x.double(), y.double()
    logits = 7.5 * x64 @ y64.T
    image_to_text = [-(logits[i, i] - torch.logsumexp(logits[i], 0)) for i in range(5)]
    text_to_image = [-(logits[j, j] - torch.logsumexp(logits[:, j], 0)) for j in range(5)]
    expected = (sum(image_to_text) / 5 + sum(text_to_image) / 5) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_clip_loss_matches_cross_entropy_form_of_the_paper():
    x, y = random_features(6, seed=3), random_features(6, seed=4)
    logits = 10 * x @ y.T
    paper = (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.T, torch.arange(6))) / 2
    ours = cm.ContrastiveLoss()(x, y, torch.tensor(10.0), torch.arange(6))
    assert ours.item() == pytest.approx(paper.item(), rel=1e-6)


def test_duplicate_images_in_a_batch_are_not_negatives_of_each_other():
    # Items 0 and 1 are two captions of the same image (id 7): each caption may match either copy.
    x, y = random_features(4, seed=5).double(), random_features(4, seed=6).double()
    ids = torch.tensor([7, 7, 3, 4])
    loss = cm.ContrastiveLoss()(x, y, torch.tensor(5.0, dtype=torch.float64), ids)
    logits = 5 * x @ y.T
    positives = ids[:, None] == ids[None, :]

    def nll(rows, mask):
        return sum(-(torch.logsumexp(rows[i][mask[i]], 0) - torch.logsumexp(rows[i], 0))
                   for i in range(4)) / 4
    expected = (nll(logits, positives) + nll(logits.T, positives.T)) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-9)
    # ... and that differs from treating position i as the only right answer
    assert loss.item() != pytest.approx(cm.ContrastiveLoss()(x, y, torch.tensor(5.0), torch.arange(4)).item())


def test_siglip_loss_equals_float64_reference_computed_by_hand():
    x, y = random_features(4, seed=7).double(), random_features(4, seed=8).double()
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    loss = cm.SigLipLoss()(x, y, scale, torch.arange(4), bias)
    total = 0.0
    for i in range(4):
        for j in range(4):
            z = 1.0 if i == j else -1.0
            total += -math.log(1 / (1 + math.exp(-z * (10 * float(x[i] @ y[j]) - 3))))
    assert loss.item() == pytest.approx(total / 4, rel=1e-9)


def test_gradients_reach_both_towers_and_the_temperature(tiny):
    model = tiny.model
    model.zero_grad()
    images, texts = tiny_batch(tiny)
    out = model(images, texts)
    cm.ContrastiveLoss()(out["image_features"], out["text_features"], out["logit_scale"],
                         torch.arange(4)).backward()
    assert model.visual.conv1.weight.grad.abs().sum() > 0
    assert model.token_embedding.weight.grad.abs().sum() > 0
    assert model.logit_scale.grad.abs() > 0
    model.zero_grad()


def test_logit_scale_starts_at_one_over_0_07_and_is_clamped_at_100(tiny):
    assert tiny.model.logit_scale.item() == pytest.approx(math.log(1 / 0.07), rel=1e-6)
    with torch.no_grad():
        tiny.model.logit_scale.fill_(8.0)
    cm.clamp_logit_scale(tiny.model)
    assert tiny.model.logit_scale.exp().item() == pytest.approx(100.0, rel=1e-6)
    with torch.no_grad():
        tiny.model.logit_scale.fill_(cm.LOG_INIT_LOGIT_SCALE)


def test_siglip_model_has_a_learned_bias():
    setup = cm.build_model("tiny-vit-64", loss="siglip")
    assert setup.model.logit_bias.item() == pytest.approx(-10.0)
    assert setup.model.logit_scale.exp().item() == pytest.approx(10.0, rel=1e-5)


# ---- models ------------------------------------------------------------------------------------

def test_presets_are_registered_with_open_clip():
    for name in ("tiny-vit-64", "small-vit-128", "simple-rn18"):
        assert name in cm.PRESETS
        assert open_clip.get_model_config(name) is not None


def test_tiny_preset_has_a_few_million_parameters_at_64_px(tiny):
    assert 2e6 < cm.count_parameters(tiny.model) < 10e6
    assert tuple(tiny.preprocess_cfg["size"]) == (64, 64)


def test_unknown_model_name_names_the_flag_and_the_presets():
    with pytest.raises(ValueError, match="--model_name 'no-such-model'.*tiny-vit-64"):
        cm.build_model("no-such-model")


def test_unknown_pretrained_tag_lists_the_tags():
    with pytest.raises(ValueError, match="'no-such-tag'.*tags: .*openai"):
        cm.build_model("RN50", pretrained="no-such-tag")


def test_an_unreachable_download_fails_fast_with_a_way_out(monkeypatch):
    import time
    monkeypatch.setattr(cm, "_cached_hf_file", lambda entry: None)
    monkeypatch.setattr(cm, "_host_reachable", lambda url, timeout=3.0: False)
    started = time.time()
    with pytest.raises(cm.PretrainedUnavailable, match="RN50/openai.*--pretrained /path/to"):
        cm.resolve_pretrained("RN50", "openai")
    assert time.time() - started < 5


def test_hf_hub_offline_means_never_trying_the_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(cm, "_cached_hf_file", lambda entry: None)
    monkeypatch.setattr(cm, "_host_reachable", lambda url, timeout=3.0: pytest.fail("network tried"))
    with pytest.raises(cm.PretrainedUnavailable, match="HF_HUB_OFFLINE is set.*--pretrained /path/to"):
        cm.resolve_pretrained("RN50", "openai")


def test_the_network_probe_goes_through_the_proxy_of_https_proxy(monkeypatch):
    import socket
    import threading
    server = socket.create_server(("127.0.0.1", 0))
    seen = []

    def proxy():   # a proxy that cannot reach anything: it answers every CONNECT with 502
        connection, _ = server.accept()
        seen.append(connection.recv(4096).decode("latin-1").splitlines()[0])
        connection.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
        connection.close()
    thread = threading.Thread(target=proxy, daemon=True)
    thread.start()
    for name in ("NO_PROXY", "no_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{server.getsockname()[1]}")
    assert cm._host_reachable("https://huggingface.co/timm/some-model", timeout=5) is False
    thread.join(5)
    server.close()
    assert seen and seen[0].startswith("CONNECT huggingface.co:443 ")


def test_a_local_open_clip_weights_file_loads(tmp_path, tiny):
    path = tmp_path / "weights.pt"
    torch.save(tiny.model.state_dict(), path)              # a bare open_clip state dict
    loaded = cm.build_model("tiny-vit-64", pretrained=str(path))
    for (name, a), b in zip(tiny.model.state_dict().items(), loaded.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_custom_config_json_builds_and_rebuilds_from_the_checkpoint_alone(tmp_path):
    config = json.loads((cm.PRESET_DIR / "tiny-vit-64.json").read_text())
    config["vision_cfg"]["layers"] = 2
    config["embed_dim"] = 96
    path = tmp_path / "my-custom-clip.json"
    path.write_text(json.dumps(config))
    setup = cm.build_model(str(path))
    assert setup.model_name == "my-custom-clip"
    assert setup.model.visual.proj.shape[1] == 96
    cm.save_checkpoint(tmp_path / "c.pt", setup, step=3)
    # forget the config, as a fresh process on another machine would
    open_clip.factory._MODEL_CONFIGS.pop("my-custom-clip")
    rebuilt, checkpoint = cm.model_from_checkpoint(tmp_path / "c.pt")
    assert checkpoint["step"] == 3
    assert len(rebuilt.model.visual.transformer.resblocks) == 2
    images, texts = tiny_batch(setup, 2)
    setup.model.eval(), rebuilt.model.eval()
    assert torch.equal(setup.model.encode_image(images), rebuilt.model.encode_image(images))


def test_encode_helpers_return_unit_vectors_without_gradient(tiny):
    images, _ = tiny_batch(tiny, 5)
    loader = [(images[:3], torch.arange(3)), (images[3:], torch.arange(3, 5))]
    image_features = cm.encode_images(tiny.model, loader, "cpu")
    text_features = cm.encode_texts(tiny.model, tiny.tokenizer, ["a", "b", "c"], "cpu", batch_size=2)
    assert image_features.shape == (5, 128) and text_features.shape == (3, 128)
    assert torch.allclose(image_features.norm(dim=1), torch.ones(5), atol=1e-5)
    assert torch.allclose(text_features.norm(dim=1), torch.ones(3), atol=1e-5)
    assert not image_features.requires_grad


def test_chinese_text_encodes_to_distinct_features(tiny):
    tokens = tiny.tokenizer(["左边有一个红色的圆形", "右边有一个蓝色的方形"])
    assert (tokens[0] != 0).sum() > 5
    features = cm.encode_texts(tiny.model, tiny.tokenizer, ["左边有一个红色的圆形", "右边有一个蓝色的方形"], "cpu")
    assert not torch.allclose(features[0], features[1])


# ---- fine-tuning controls -----------------------------------------------------------------------

def trainable(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_freeze_backbone_trains_only_projections_and_temperature():
    setup = cm.build_model("tiny-vit-64")
    cm.freeze_for_finetuning(setup.model, freeze_backbone=True)
    assert trainable(setup.model) == {"visual.proj", "text_projection", "logit_scale"}


def tower_names(names, tower):
    image = {n for n in names if n.startswith("visual.")}
    return image if tower == "image" else names - image - {"logit_scale"}


BLOCK_OF = {"image": "visual.transformer.resblocks.", "text": "transformer.resblocks."}
AFTER_BLOCKS = {"image": ("visual.ln_post.", "visual.proj"), "text": ("ln_final.", "text_projection")}


@pytest.mark.parametrize("tower", ["image", "text"])
@pytest.mark.parametrize("keep", [0, 1, 2])
def test_lock_keeps_exactly_the_last_n_blocks_and_what_follows_them_trainable(tower, keep):
    setup = cm.build_model("tiny-vit-64")                          # 4 blocks in each tower
    all_names = trainable(setup.model)
    cm.freeze_for_finetuning(setup.model, **{f"lock_{tower}": keep})
    names = trainable(setup.model)
    expected = {n for n in tower_names(all_names, tower)
                if keep and (n.startswith(AFTER_BLOCKS[tower])
                             or any(n.startswith(f"{BLOCK_OF[tower]}{b}.") for b in range(4 - keep, 4)))}
    assert tower_names(names, tower) == expected
    other = "text" if tower == "image" else "image"
    assert tower_names(names, other) == tower_names(all_names, other)     # the other tower is untouched
    assert "logit_scale" in names


def test_frozen_resnet_tower_freezes_batchnorm_statistics():
    setup = cm.build_model("simple-rn18")
    cm.freeze_for_finetuning(setup.model, lock_image=0)
    trunk = setup.model.visual.trunk
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in trunk.modules())
    buffers = {k: v.clone() for k, v in trunk.state_dict().items() if "running" in k}
    assert buffers
    setup.model.train()
    setup.model.encode_image(torch.randn(2, 3, 128, 128))
    for k, v in trunk.state_dict().items():
        if "running" in k:
            assert torch.equal(v, buffers[k]), k
    assert not any(p.requires_grad for p in trunk.parameters())


def test_grad_checkpointing_and_patch_dropout_are_applied():
    setup = cm.build_model("tiny-vit-64", grad_checkpointing=True, patch_dropout=0.5)
    assert setup.model.visual.transformer.grad_checkpointing
    assert setup.model.visual.patch_dropout.prob == 0.5


# ---- checkpoints --------------------------------------------------------------------------------

def test_save_and_load_give_identical_outputs_and_open_clip_reads_our_checkpoint(tmp_path, tiny):
    path = tmp_path / "ckpt.pt"
    cm.save_checkpoint(path, tiny, step=12, rng=cm.rng_state())
    images, texts = tiny_batch(tiny)
    tiny.model.eval()
    expected = tiny.model(images, texts)
    rebuilt, checkpoint = cm.model_from_checkpoint(path)
    rebuilt.model.eval()
    got = rebuilt.model(images, texts)
    assert torch.equal(expected["image_features"], got["image_features"])
    assert torch.equal(expected["text_features"], got["text_features"])
    theirs = open_clip.create_model("tiny-vit-64", pretrained=str(path)).eval()
    assert torch.equal(theirs.encode_image(images, normalize=True), expected["image_features"])
    assert checkpoint["step"] == 12


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path, tiny):
    import random
    cm.save_checkpoint(tmp_path / "r.pt", tiny, rng=cm.rng_state())
    expected = (torch.rand(3), np.random.rand(3), random.random())
    cm.set_rng_state(cm.load_checkpoint(tmp_path / "r.pt")["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0])
    assert np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def test_truncated_checkpoint_gives_a_clear_error(tmp_path, tiny):
    path = tmp_path / "last.pt"
    cm.save_checkpoint(path, tiny)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(cm.CheckpointError, match="last.pt cannot be read.*truncated"):
        cm.load_checkpoint(path)


def test_a_save_killed_midway_leaves_the_previous_checkpoint_intact(tmp_path, tiny, monkeypatch):
    path = tmp_path / "last.pt"
    cm.save_checkpoint(path, tiny, step=1)

    def dies_midway(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        cm.save_checkpoint(path, tiny, step=2)
    monkeypatch.undo()
    assert cm.load_checkpoint(path)["step"] == 1


def test_checkpoint_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "x": Evil()}, path)
    with pytest.raises(cm.CheckpointError, match="NOT loaded.*could run any code") as refused:
        cm.load_checkpoint(path)
    assert "weights_only" not in str(refused.value)       # torch's advice is the attack: not passed on


def test_an_unsafe_pretrained_file_is_refused_in_one_line_and_runs_nothing(tmp_path, capfd):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {}, "x": Evil()}, path)
    with pytest.raises(cm.CheckpointError, match="NOT loaded") as refused:
        cm.build_model("tiny-vit-64", pretrained=str(path))
    assert "\n" not in str(refused.value) and "weights_only" not in str(refused.value)
    assert "pwned" not in capfd.readouterr().out


def test_weights_of_another_architecture_are_refused_in_one_line_naming_both(tmp_path, tiny):
    path = tmp_path / "tiny.pt"
    cm.save_checkpoint(path, tiny)
    with pytest.raises(cm.CheckpointError, match="holds a tiny-vit-64 model, not simple-rn18: "
                                                 "[0-9]+ tensors missing") as refused:
        cm.build_model("simple-rn18", pretrained=str(path))
    assert "\n" not in str(refused.value)
    other = cm.build_model("simple-rn18")
    with pytest.raises(cm.CheckpointError, match="tensors missing.*of another shape"):
        cm.load_weights(other.model, cm.load_checkpoint(path)["state_dict"], path, "simple-rn18")
    (tmp_path / "junk.pt").write_bytes(b"not a weights file")
    with pytest.raises(cm.CheckpointError, match="junk.pt cannot be read"):
        cm.build_model("tiny-vit-64", pretrained=str(tmp_path / "junk.pt"))


def test_a_checkpoint_of_a_newer_format_is_refused_with_a_way_out(tmp_path, tiny):
    cm.save_checkpoint(tmp_path / "new.pt", tiny)
    checkpoint = torch.load(tmp_path / "new.pt", weights_only=True)
    checkpoint["format"] = cm.CHECKPOINT_FORMAT + 1
    torch.save(checkpoint, tmp_path / "new.pt")
    with pytest.raises(cm.CheckpointError, match="newer version of this code.*update"):
        cm.load_checkpoint(tmp_path / "new.pt")


HOSTILE_NAMES = ["/{outside}/evil", "../../evil", "../evil", "evil\x00name", "e" * 5000, "a/b/../../evil"]


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=["absolute", "dotdot", "parent", "nul", "long", "nested"])
def test_a_checkpoint_cannot_make_loading_write_outside_a_private_temporary_folder(tmp_path, tiny,
                                                                                 monkeypatch, name):
    # The config differs from the preset's, so loading rebuilds the architecture from the file.
    outside, temp = tmp_path / "outside", tmp_path / "temp"
    outside.mkdir(), temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.chdir(outside)
    setup = cm.build_model("tiny-vit-64", context_length=40)
    setup.model_name = name.format(outside=str(outside).lstrip("/"))
    cm.save_checkpoint(tmp_path / "c.pt", setup)
    rebuilt, _ = cm.model_from_checkpoint(tmp_path / "c.pt")
    assert rebuilt.model.positional_embedding.shape[0] == 40
    assert list(outside.iterdir()) == [] and list(temp.iterdir()) == []    # nothing written, nothing left
    assert set(tmp_path.iterdir()) == {outside, temp, tmp_path / "c.pt"}


def test_a_checkpoint_config_with_keys_open_clip_does_not_know_is_refused(tmp_path, tiny, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    for extra in ({"evil": "x"}, {"vision_cfg": {**tiny.model_config["vision_cfg"], "evil": 1}}):
        setup = cm.ClipSetup(tiny.model, tiny.tokenizer, tiny.preprocess_cfg, "tiny-vit-64",
                             {**tiny.model_config, **extra})
        cm.save_checkpoint(tmp_path / "c.pt", setup)
        with pytest.raises(cm.CheckpointError, match="model_config cannot be built by open_clip"):
            cm.model_from_checkpoint(tmp_path / "c.pt")
        assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def hostile_checkpoint(path, setup, **changes):
    """One of our checkpoints with some of its entries replaced, as a file from elsewhere may be."""
    cm.save_checkpoint(path, setup)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint.update(changes)
    torch.save(checkpoint, path)
    return path


def text_cfg(tiny, **changes):
    return {**tiny.model_config, "text_cfg": {**tiny.model_config["text_cfg"], **changes}}


HOSTILE_CHECKPOINTS = {
    "non-tensor value": (lambda tiny: {"state_dict": {**tiny.model.state_dict(), "visual.proj": "x"}},
                         r"its state_dict holds a str under 'visual.proj', where only tensors"),
    "state_dict a list": (lambda tiny: {"state_dict": [1, 2]}, r"its state_dict is a list, not a dictionary"),
    "unknown format": (lambda tiny: {"format": "2"}, r"has format '2', not a format of ours"),
    "embed_dim 2^40": (lambda tiny: {"model_config": {**tiny.model_config, "embed_dim": 2 ** 40}},
                       r"tiny-vit-64: its 'model_config.embed_dim' is 1099511627776, beyond any real model"),
    "2000 layers": (lambda tiny: {"model_config": text_cfg(tiny, layers=2000)},
                    r"its text_cfg has 2000 layers, beyond any real model \(at most 1024\)"),
    # each number within bounds, the whole 3 x 10^14 parameters: counted on the meta device
    "3e14 parameters": (lambda tiny: {"model_config": text_cfg(tiny, width=2 ** 19, layers=100, heads=8)},
                        r"its model_config describes 329,880,[0-9,]+ parameters, beyond any real model"),
    "hf_tokenizer_name without transformers": (
        lambda tiny: {"model_config": text_cfg(tiny, hf_tokenizer_name="bert-base-uncased")},
        r"its model_config cannot be built by open_clip \(ModuleNotFoundError: .*transformers"),
    "preprocess_cfg a list": (lambda tiny: {"preprocess_cfg": [224]}, r"and a preprocess_cfg dict"),
    # open_clip hands tokenizer_kwargs to transformers, which would run the hub repository's code
    "trust_remote_code": (
        lambda tiny: {"model_config": text_cfg(tiny, hf_tokenizer_name="evil/repo",
                                               tokenizer_kwargs={"trust_remote_code": True})},
        r"its model_config asks for trust_remote_code, which would run code from the Hugging Face hub"),
}


@pytest.mark.parametrize("name", HOSTILE_CHECKPOINTS)
def test_a_hostile_checkpoint_is_refused_in_one_line_naming_the_file_before_anything_is_built(
        tmp_path, tiny, name, monkeypatch):
    changes, message = HOSTILE_CHECKPOINTS[name]
    if "transformers" in name:
        monkeypatch.setitem(sys.modules, "transformers", None)   # absent, even where it is installed
    path = hostile_checkpoint(tmp_path / "c.pt", tiny, **changes(tiny))
    built = []
    monkeypatch.setattr(open_clip.model.CLIP, "__init__", _recording(open_clip.model.CLIP.__init__, built))
    with pytest.raises(cm.CheckpointError, match=message) as refused:
        cm.model_from_checkpoint(path)
    assert str(refused.value).startswith(f"checkpoint {path}") and "\n" not in str(refused.value)
    if "transformers" not in name:        # refused before open_clip built anything but on the meta device
        assert all(device == "meta" for device in built), built


def _recording(init, built):
    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        built.append(next(self.parameters()).device.type)
    return recording_init


def test_the_size_bound_counts_the_parameters_exactly_on_the_meta_device(tiny, tmp_path, monkeypatch):
    cm.save_checkpoint(tmp_path / "c.pt", tiny)
    counted, count = [], cm.count_parameters

    def recording_count(model, trainable_only=False):
        counted.append((next(model.parameters()).device.type, count(model)))
        return counted[-1][1]
    monkeypatch.setattr(cm, "count_parameters", recording_count)
    cm.model_from_checkpoint(tmp_path / "c.pt")
    assert counted == [("meta", count(tiny.model))] and count(tiny.model) == 7_981_057


def test_weights_files_that_are_not_weights_are_refused_in_one_line(tmp_path, tiny):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"x": Evil()}, tmp_path / "pickle.pt")
    cm.save_checkpoint(tmp_path / "whole.pt", tiny)
    data = (tmp_path / "whole.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[:len(data) // 2])
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    torch.save({"a": 1}, tmp_path / "number.pt")
    for name, message in [("pickle.pt", "NOT loaded"), ("truncated.pt", "cannot be read.*truncated"),
                          ("list.pt", "its state_dict is a list"), ("number.pt", "holds a int under 'a'"),
                          ("/etc/passwd", "passwd cannot be read.*not a weights file")]:
        with pytest.raises(cm.CheckpointError, match=message) as refused:
            cm.read_weights(tmp_path / name)
        assert "\n" not in str(refused.value)


# ---- tokenising ---------------------------------------------------------------------------------

def test_a_caption_of_100000_letters_without_spaces_is_tokenised_in_well_under_a_second(tiny):
    import time
    started = time.perf_counter()
    tokens = tiny.tokenizer(["".join(np.random.default_rng(0).choice(list("abcdefgh"), 100_000))])
    assert time.perf_counter() - started < 1.5          # uncut: 77 s
    assert tokens.shape == (1, 32) and (tokens[0] != 0).all()


@pytest.mark.parametrize("text", ["random", "chinese", "spaces"])
def test_cutting_long_captions_never_changes_the_tokens_kept(text):
    tokenizer = cm.CaptionTokenizer(open_clip.get_tokenizer("ViT-B-32"))     # 77 tokens
    rng = np.random.default_rng(1)
    caption = {"random": "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), 4000)),
               "chinese": "".join(rng.choice(list("红色的圆形在左边蓝方块"), 4000)),
               "spaces": "a   red\t\tcircle " * 300 + "x" * 3000}[text]
    assert len(tokenizer.cut(caption)) < len(caption)
    assert torch.equal(tokenizer([caption]), tokenizer.tokenizer([caption]))


def test_a_longer_context_is_kept_in_the_checkpoint_without_changing_the_preset(tmp_path):
    setup = cm.build_model("tiny-vit-64", context_length=48)
    assert setup.tokenizer(["一个红色的圆形"]).shape == (1, 48)
    cm.save_checkpoint(tmp_path / "c.pt", setup)
    rebuilt, _ = cm.model_from_checkpoint(tmp_path / "c.pt")
    assert rebuilt.model.positional_embedding.shape[0] == 48
    assert rebuilt.tokenizer(["a"]).shape == (1, 48)
    assert cm.build_model("tiny-vit-64").model.positional_embedding.shape[0] == 32


@pytest.mark.slow
def test_a_pretrained_tag_uses_the_cached_download_with_the_tags_settings(tmp_path, monkeypatch):
    # The OpenAI RN50 weights need QuickGELU; a cached file must be found without any network.
    reference = cm.build_model("RN50").model
    path = tmp_path / "open_clip_model.bin"
    torch.save(reference.state_dict(), path)
    monkeypatch.setattr(cm, "_cached_hf_file", lambda entry: str(path))
    monkeypatch.setattr(cm, "_host_reachable", lambda url, timeout=3.0: pytest.fail("no network use"))
    loaded = cm.build_model("RN50", pretrained="openai")
    assert loaded.model.transformer.resblocks[0].mlp.gelu.__class__.__name__ == "QuickGELU"
    assert torch.equal(loaded.model.logit_scale, reference.logit_scale)
    assert torch.equal(loaded.model.visual.conv1.weight, reference.visual.conv1.weight)
