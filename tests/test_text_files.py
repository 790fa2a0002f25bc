"""Checkpoints rebuild from themselves: a Hugging Face text tower's config and its tokenizer's
files travel in the checkpoint (clip_model.TEXT_FILES), are checked before anything is written,
and serve evaluation and export with the original folder gone and no network. LiT locking of
such a tower keeps its last layers trainable."""
import dataclasses
import json
import shutil
import tempfile
from types import SimpleNamespace

import open_clip
import pytest
import torch
import transformers

import clip_model as cm
import sample_data
import train
import train_step
from text_tower_runs import evaluate_and_export, features, train_one_step

CONFIG_NAME = "tiny-bert-clip"
# A WordPiece vocabulary of the generated captions' words and a few Chinese characters, so that
# captions get tokens of their own; BERT's special tokens first, [PAD] = 0 as BERT pads.
VOCABULARY = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", ".", ":", "a", "and", "at", "in", "is",
              "near", "of", "on", "the", "there", "two", "picture", "photo", "shapes", "left", "right", "top",
              "bottom", "center", "centre", "middle", "side", "half", "upper", "lower", "small", "little",
              "tiny", "large", "big", "huge", "red", "green", "blue", "yellow", "purple", "circle", "square",
              "triangle", "star", *"红绿蓝黄紫色圆正方三角星形左右上下中间边侧有一个的在"]
CAPTIONS = ["a red circle on the left", "two shapes: a blue square, a green star", "左边有一个红色的圆形"]


def write_tiny_bert(root):
    """A folder holding a tiny BERT (2 layers of width 32, random weights) as transformers saves it,
    with a vocabulary and a tokenizer config; and an open_clip model config .json naming that
    folder as its text tower and tokenizer. Returns (folder, config path)."""
    folder = root / "tiny-bert"
    config = transformers.BertConfig(vocab_size=len(VOCABULARY), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(VOCABULARY) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer",
                                                              "do_lower_case": True}))
    path = root / f"{CONFIG_NAME}.json"
    path.write_text(json.dumps({
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 32, "layers": 2, "head_width": 16},
        "text_cfg": {"hf_model_name": str(folder), "hf_tokenizer_name": str(folder), "hf_proj_type": "linear",
                     "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 32}}))
    return folder, path


@pytest.fixture(autouse=True)
def forget_the_config():
    """open_clip registers a config .json by its name; each test starts without it, as a fresh
    process would."""
    yield
    open_clip.factory._MODEL_CONFIGS.pop(CONFIG_NAME, None)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return sample_data.create_sample_dataset(tmp_path_factory.mktemp("data"), num_samples=32, seed=0)


@pytest.fixture(scope="module")
def bert_run(data, tmp_path_factory):
    """A checkpoint of one train.py step of a CLIP whose text tower and tokenizer are the tiny BERT
    folder, the features of its weights (built as training built them, from the folder), and then
    the folder deleted."""
    out = tmp_path_factory.mktemp("bert")
    folder, config = write_tiny_bert(out)
    checkpoint = train_one_step(config, data["index"], out, "bert")
    reference = cm.build_model(str(config))
    cm.load_weights(reference.model, cm.load_checkpoint(checkpoint)["state_dict"], checkpoint, CONFIG_NAME)
    expected = features(reference, CAPTIONS)
    shutil.rmtree(folder)
    open_clip.factory._MODEL_CONFIGS.pop(CONFIG_NAME)
    return {"checkpoint": checkpoint, "features": expected, "out": out}


@pytest.mark.slow
def test_an_hf_tokenizer_checkpoint_rebuilds_without_its_folder_or_the_network(bert_run, offline):
    checkpoint = cm.load_checkpoint(bert_run["checkpoint"])
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= set(checkpoint["text_files"])
    assert checkpoint["model_config"]["text_cfg"]["hf_model_name"].endswith("tiny-bert")   # the name it had
    rebuilt, _ = cm.model_from_checkpoint(bert_run["checkpoint"])
    tokens, texts, images = features(rebuilt, CAPTIONS)
    expected_tokens, expected_texts, expected_images = bert_run["features"]
    assert torch.equal(tokens, expected_tokens) and (tokens[:, 1] != 1).all()      # 1 = [UNK]
    torch.testing.assert_close(texts, expected_texts, rtol=0, atol=1e-6)
    torch.testing.assert_close(images, expected_images, rtol=0, atol=1e-6)
    assert rebuilt.text_files == checkpoint["text_files"]          # and its own checkpoints carry them


@pytest.mark.slow
def test_an_hf_tokenizer_checkpoint_evaluates_and_exports_offline(bert_run, data, offline):
    folder = bert_run["out"] / "export"
    evaluate_and_export(bert_run["checkpoint"], data, folder)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):       # the folder holds them
        assert (folder / name).read_text(encoding="utf-8") == \
            cm.load_checkpoint(bert_run["checkpoint"])["text_files"][name]
    assert json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"][
        "hf_model_pretrained"] is False


@pytest.mark.slow
def test_a_checkpoint_without_text_files_says_where_it_reads_them_from(bert_run, tmp_path, offline):
    # written before checkpoints carried them: the tower and tokenizer are read where the config
    # names them, here a folder that is gone
    checkpoint = cm.load_checkpoint(bert_run["checkpoint"])
    del checkpoint["text_files"]
    torch.save(checkpoint, tmp_path / "old.pt")
    way_out = "the checkpoint does not carry its text tower's files and reads them from '"
    with pytest.raises(cm.CheckpointError, match=way_out) as refused:
        cm.model_from_checkpoint(tmp_path / "old.pt")
    assert "\n" not in str(refused.value)


def bert_config(**changes):
    return json.dumps({"model_type": "bert", "vocab_size": 60, "hidden_size": 32, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "intermediate_size": 64, **changes})


HOSTILE_TEXT_FILES = {
    "a relative path": ({"../../evil.txt": "x"}, r"its text_files holds '\.\./\.\./evil\.txt', not one of the files"),
    "an absolute path": ({"/tmp/evil.json": "{}"}, r"its text_files holds '/tmp/evil\.json', not one of the files"),
    "a list": (["config.json"], r"its text_files is a list, not a dictionary"),
    "a number": ({"vocab.txt": 5}, r"its text_files holds a int as vocab\.txt, where only text belongs"),
    "over the size bound": ({"vocab.txt": "[PAD]\n" * 200}, r"its text_files hold more than 1,000 bytes"),
    "auto_map in config.json": ({"config.json": bert_config(auto_map={"AutoModel": "evil.Model"})},
                                r"config\.json has an auto_map"),
    "auto_map in tokenizer_config.json": (
        {"tokenizer_config.json": json.dumps({"auto_map": {"AutoTokenizer": ["evil.Tokenizer", None]}})},
        r"tokenizer_config\.json has an auto_map"),
    "not JSON": ({"config.json": "{not json"}, r"config\.json is not JSON"),
    "an unknown model type": ({"config.json": bert_config(model_type="gpt2")},
                              r"config\.json is of model type 'gpt2', not one whose text tower open_clip builds"),
    "a width of 2^40": ({"config.json": bert_config(hidden_size=2 ** 40)},
                        r"config\.json has 'hidden_size' 1099511627776, beyond any real model"),
    "100000 layers": ({"config.json": bert_config(num_hidden_layers=100_000)},
                      r"config\.json has 100000 layers, beyond any real model \(at most 1024\)"),
}


@pytest.fixture(scope="module")
def tiny():
    return cm.build_model("tiny-vit-64")


@pytest.mark.parametrize("name", HOSTILE_TEXT_FILES)
def test_hostile_text_files_are_refused_in_one_line_and_nothing_is_written(tmp_path, tiny, monkeypatch, name):
    text_files, message = HOSTILE_TEXT_FILES[name]
    monkeypatch.setattr(cm, "MAX_TEXT_FILES_BYTES", 1000)
    path = tmp_path / "c.pt"
    cm.save_checkpoint(path, tiny)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["text_files"] = text_files
    torch.save(checkpoint, path)
    outside, temp = tmp_path / "outside", tmp_path / "temp"
    outside.mkdir(), temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.chdir(outside)
    with pytest.raises(cm.CheckpointError, match=message) as refused:
        cm.model_from_checkpoint(path)
    assert str(refused.value).startswith(f"checkpoint {path}: ") and "\n" not in str(refused.value)
    assert list(outside.iterdir()) == [] and list(temp.iterdir()) == []


def test_the_moving_averages_setup_keeps_the_text_towers_files(tiny, tmp_path):
    setup = dataclasses.replace(tiny, text_files={"vocab.txt": "[PAD]\n[UNK]\n"})
    job = SimpleNamespace(setup=setup, ema=train_step.build_ema(SimpleNamespace(ema_decay=0.9), setup.model))
    averaged = train.ema_setup(job)
    assert averaged.model is job.ema.module and averaged.text_files == setup.text_files
    assert averaged.model_config == setup.model_config and averaged.tokenizer is setup.tokenizer
    cm.save_checkpoint(tmp_path / "best.pt", averaged)
    assert cm.load_checkpoint(tmp_path / "best.pt")["text_files"] == setup.text_files


@pytest.mark.parametrize("keep", [0, 1, 2])
def test_lock_text_keeps_the_last_n_bert_layers_and_the_projection_trainable(tmp_path, keep):
    _, config = write_tiny_bert(tmp_path)
    setup = cm.build_model(str(config))                           # 2 encoder layers
    names = {name for name, _ in setup.model.named_parameters()}
    cm.freeze_for_finetuning(setup.model, lock_text=keep)
    trainable = {name for name, p in setup.model.named_parameters() if p.requires_grad}
    text = {name for name in names if name.startswith("text.")}
    assert any(name.startswith("text.transformer.embeddings.") for name in text)
    expected = {name for name in text if keep and (
        name.startswith("text.proj.") or
        any(name.startswith(f"text.transformer.encoder.layer.{layer}.") for layer in range(2 - keep, 2)))}
    assert trainable & text == expected
    assert trainable - text == names - text               # the image tower and the temperature train
