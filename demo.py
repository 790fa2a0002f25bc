"""The whole pipeline in one command: `python demo.py [--language zh] [train.py flags ...]`.

Generates a small data set of coloured shapes with captions, trains a tiny CLIP on it, evaluates
retrieval and zero-shot classification, draws every plot, and answers a few text queries.
Any flag demo.py does not know goes to train.py (e.g. `--num_epochs 20 --model_name simple-rn18`).
With a captioner (`--model_name tiny-coca-64`, a CoCa) it also writes captions of validation
images, scores them (BLEU, CIDEr-D), prints a few and draws them (captions.png); the --caption_
flags say how it writes them.
"""
import argparse
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

import clip_model
import evaluation
import sample_data
import settings
import train
import visualization
from errors import run_script

QUERIES = {"en": ["a large red circle on the left", "a small blue square at the top",
                  "a yellow star and a green triangle"],
           "zh": ["左边有一个大的红色圆形", "上方有一个小的蓝色正方形", "图中有黄色星形和绿色三角形"]}
# A budget that trains the tiny preset to clearly useful recall in about two minutes on 2 CPU cores.
TRAIN_DEFAULTS = ["--model_name", "tiny-vit-64", "--batch_size", "64", "--num_epochs", "3",
                  "--learning_rate", "1e-3", "--warmup_steps", "30", "--eval_every", "0"]
# A captioner captions this many validation images: beam search is slow on a CPU (evaluation.py).
CAPTIONED_IMAGES = 50


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--language", default="en", choices=["en", "zh"], help="caption language")
    parser.add_argument("--num_samples", type=int, default=2000, help="training images to generate")
    parser.add_argument("--val_samples", type=int, default=200, help="validation images to generate")
    parser.add_argument("--data_root", default="data", help="where the generated data goes")
    parser.add_argument("--run_name", default=None, help="run folders' name (default: demo-LANGUAGE); "
                        "an earlier demo run of that name is replaced")
    clip_model.CaptionSettings.add_arguments(parser)
    return parser


def generate_data(args):
    """Training and validation sets from different seeds (no image shared), generated once."""
    root = Path(args.data_root) / f"demo-{args.language}-{args.num_samples}"
    sets = {}
    for split, count, seed in (("train", args.num_samples, 0), ("val", args.val_samples, 1)):
        folder = root / split
        if not (folder / "data.json").is_file():
            print(f"generating {count} {split} images in {folder}")
            sample_data.create_sample_dataset(folder, num_samples=count, seed=seed,
                                              language=args.language)
        sets[split] = folder
    return sets


def answer_queries(checkpoint, embeddings_dir, queries):
    """Rank the validation images for a few free-text queries: search with a trained CLIP."""
    setup, _ = clip_model.model_from_checkpoint(checkpoint)
    saved = evaluation.load_embeddings(embeddings_dir)
    images = torch.from_numpy(saved["image_features"])
    queries_features = clip_model.encode_texts(setup.model, setup.tokenizer, queries, "cpu")
    captions, owner = saved["meta"]["captions"], saved["caption_image"]
    for query, scores in zip(queries, queries_features @ images.T):
        print(f"\nquery: {query}")
        for rank, i in enumerate(scores.topk(3).indices.tolist(), 1):
            first_caption = captions[int((owner == i).nonzero()[0][0])]
            print(f"  {rank}. {Path(saved['meta']['image_names'][i]).name}  "
                  f"(cosine {scores[i]:.3f}): {first_caption}")


def main(argv=None):
    args, train_flags = build_parser().parse_known_args(argv)
    started = time.time()
    # a captioner's generation settings go to its evaluation, checked before it trains
    caption_flags = [flag for name, value in asdict(clip_model.CaptionSettings.from_args(args)).items()
                     for flag in (f"--caption_{name}", str(value))]
    data = generate_data(args)

    print("\n== 1/4 training")
    # Chinese captions take about 3 tokens per character: give the text tower a longer context.
    language_flags = ["--context_length", "64"] if args.language == "zh" else []
    flags = [*TRAIN_DEFAULTS, *language_flags, "--data_dir", str(data["train"]), "--val_data",
             str(data["val"]), "--run_name", args.run_name or f"demo-{args.language}", *train_flags]
    remove_earlier_run(settings.parse_config(flags))
    run = train.main(flags)

    print("\n== 2/4 evaluating the best checkpoint: retrieval, zero-shot (and a captioner's captions)")
    checkpoint, results_dir = run["checkpoint_dir"] / "best.pt", run["results_dir"]
    results = evaluation.main(["--checkpoint", str(checkpoint), "--data", str(data["val"]),
                               "--zeroshot_dir", str(data["val"] / "zeroshot"),
                               "--language", args.language,
                               "--save_embeddings", str(results_dir / "embeddings"),
                               "--output", str(results_dir / "eval_results.json"),
                               "--caption_images", str(CAPTIONED_IMAGES), *caption_flags])

    print("\n== 3/4 plots")
    visualization.main(["--results_dir", str(results_dir), "--logs_dir", str(run["log_dir"])])

    print("\n== 4/4 text queries against the validation images")
    answer_queries(checkpoint, results_dir / "embeddings", QUERIES[args.language])
    if "captioning" in results:
        print("\n== captions the model wrote for validation images (all of them: eval_results.json, "
              "a few: captions.png)")
        show_captions(results["captioning"]["captions"])

    classes = len(results["zeroshot"]["classnames"])
    print(f"\n== summary ({time.time() - started:.0f} s)\n"
          f"{evaluation.recall_summary(results)} (chance R@1 {100 / results['num_images']:.1f})\n"
          f"zero-shot top-1 {results['zeroshot']['top1']:.1f} over {classes} classes "
          f"(chance {100 / classes:.1f})\n{caption_summary(results)}"
          f"written:\n  {checkpoint}\n  {run['log_dir']}  (tensorboard --logdir "
          f"{run['log_dir'].parent})\n  {results_dir}:")
    for path in sorted(results_dir.glob("*.*")):
        print(f"    {path.name}")
    return results


def show_captions(captions, count=5):
    """The first few captions written, each with the image's first reference caption."""
    for row in captions[:count]:
        print(f"  {Path(row['image']).name}  wrote: {row['generated']}\n"
              f"  {'':{len(Path(row['image']).name)}}  given: {row['references'][0]}")


def caption_summary(results):
    """The summary's line of a captioner's scores; none for a CLIP."""
    if "captioning" not in results:
        return ""
    c = results["captioning"]
    return (f"captions of {c['num_images']} images: BLEU-4 {c['BLEU-4_x100']:.1f}, "
            f"CIDEr-D {c['CIDEr-D_x100']:.1f}\n")


def remove_earlier_run(cfg):
    """A demo run replaces an earlier one of the same name: its three folders are removed."""
    for folder in (cfg.checkpoint_dir, cfg.log_dir, cfg.results_dir):
        shutil.rmtree(Path(folder) / cfg.run_name, ignore_errors=True)


if __name__ == "__main__":
    run_script(main, "demo.py")
