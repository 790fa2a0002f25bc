"""Weight-space interpolation of a pretrained and a fine-tuned CLIP (WiSE-FT), evaluated at each mix.

    python wise_ft.py pretrained.pt finetuned.pt --alpha 0,0.25,0.5,0.75,1 --data DATA \\
        --zeroshot DIR --output results/wise_ft.json [--save 0.5 model-checkpoint/mixed.pt]

Fine-tuning on a narrow data set gains on that data and forgets elsewhere: zero-shot accuracy on
other classes falls. Wortsman et al. (2022, "Robust fine-tuning of zero-shot models") found that
the straight line between the two sets of weights,

    theta(alpha) = (1 - alpha) * theta_pretrained + alpha * theta_finetuned,

passes through models that keep most of both: fine-tuning starts from the pretrained weights and
stays in the same basin of the loss, so the mixes in between are good models too, not the
nonsense that averaging two unrelated networks gives. alpha = 0 is the pretrained model,
alpha = 1 the fine-tuned one, exactly. Each alpha is evaluated on the task (retrieval on --data)
and on what should not be forgotten (zero-shot on --zeroshot); the curve of one against the other
is drawn beside the JSON, and --save writes the chosen mix as a checkpoint.
"""
import argparse
from pathlib import Path

import torch

import clip_model
import data_loader
import evaluation
import files
import visualization
from errors import CheckpointError, DataError, SettingsError, run_script


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("pretrained", help="the weights fine-tuning started from: a checkpoint of ours, an open_clip "
                           "weights file (or Chinese-CLIP's released .pt), or a pretrained tag of the "
                           "fine-tuned model's architecture")
    add("finetuned", help="the fine-tuned checkpoint (train.py's best.pt or last.pt)")
    add("--alpha", default="0,0.25,0.5,0.75,1", help="mixes to evaluate, comma-separated: 0 = "
                                                     "pretrained, 1 = fine-tuned (default: %(default)s)")
    add("--data", help="captioned images of the fine-tuning task, for retrieval (any format data_loader "
                       "reads, WebDataset shards too)")
    add("--zeroshot", metavar="DIR", help="zero-shot classification folder (one folder of images "
                                          "per class): what fine-tuning should not forget")
    add("--output", metavar="FILE", help="the results as JSON; the curve is drawn into FILE with .png")
    add("--save", nargs=2, metavar=("ALPHA", "PATH"), help="write the mix of ALPHA as a checkpoint")
    add("--batch_size", type=int, default=64, help="images or texts encoded per batch")
    add("--num_workers", type=int, default=2, help="data loading worker processes")
    add("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    return parser


def parse_alphas(text):
    try:
        alphas = [float(a) for a in text.split(",")]
    except ValueError:
        raise SettingsError(f"--alpha {text!r}: expected numbers separated by commas, e.g. 0,0.5,1") from None
    if not all(0 <= a <= 1 for a in alphas):
        raise SettingsError(f"--alpha {text!r}: every alpha must be in [0, 1]")
    return alphas


def load_endpoints(pretrained, finetuned, device):
    """(ClipSetup of the fine-tuned model, pretrained state dict, fine-tuned state dict), after
    checking that both hold the same tensors: one architecture."""
    setup, checkpoint = clip_model.model_from_checkpoint(finetuned, device)
    end = checkpoint["state_dict"]
    if Path(pretrained).is_file():
        start, name = clip_model.read_weights(pretrained)
    else:                                      # a pretrained tag of the same architecture
        path, _ = clip_model.resolve_pretrained(setup.model_name, pretrained)
        start, name = clip_model.read_weights(path)
    if start.keys() != end.keys() or any(start[k].shape != end[k].shape for k in end):
        raise CheckpointError(f"{pretrained} and {finetuned} are not two states of one architecture: "
                              + clip_model.state_dict_difference(start, end, name, setup.model_name))
    return setup, start, end


def interpolate(start, end, alpha):
    """theta(alpha): floating-point tensors on the straight line (torch.lerp is exact at both
    ends); integer buffers (BatchNorm's step counter) from the nearer end."""
    return {k: torch.lerp(start[k].to(end[k].dtype), end[k], alpha) if end[k].is_floating_point()
            else (end[k] if alpha >= 0.5 else start[k]) for k in end}


def evaluate_mix(setup, args, device, alpha):
    """Retrieval on --data and zero-shot on --zeroshot of the model as it is now, the mix of alpha.
    Features that are not finite (a NaN in either input's weights) are refused by evaluation, in
    one line that names the mix."""
    options = dict(batch_size=args.batch_size, num_workers=args.num_workers, device=device)
    result = {}
    try:
        if args.data:
            metrics = evaluation.evaluate_model(setup, data_loader.load_caption_index(args.data), **options)
            result["retrieval"] = metrics["retrieval"]
        if args.zeroshot:
            zeroshot = evaluation.evaluate_zeroshot(setup, args.zeroshot, **options)
            result["zeroshot"] = {k: zeroshot[k] for k in ("top1", "top5", "mean_per_class_recall")}
    except DataError as error:
        raise DataError(f"the mix of alpha {alpha} of {args.pretrained} and {args.finetuned}: {error}") from None
    return result


def format_table(results):
    lines = [f"{'alpha':>6} {'t->i R@1':>9} {'i->t R@1':>9} {'rsum':>8} {'zero-shot top-1':>16}"]
    for r in results:
        retrieval, zeroshot = r.get("retrieval"), r.get("zeroshot")
        lines.append(f"{r['alpha']:6.2f} "
                     + (f"{retrieval['text_to_image']['R@1']:9.2f} {retrieval['image_to_text']['R@1']:9.2f} "
                        f"{retrieval['rsum']:8.2f}" if retrieval else f"{'-':>9} {'-':>9} {'-':>8}")
                     + (f" {zeroshot['top1']:16.2f}" if zeroshot else f" {'-':>16}"))
    return "\n".join(lines)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.data or args.zeroshot or args.save):
        parser.error("nothing to do: give --data and/or --zeroshot to evaluate, or --save ALPHA PATH")
    alphas = parse_alphas(args.alpha)
    device = clip_model.pick_device(args.device)
    setup, start, end = load_endpoints(args.pretrained, args.finetuned, device)
    results = []
    if args.data or args.zeroshot:
        for alpha in alphas:
            setup.model.load_state_dict(interpolate(start, end, alpha))
            results.append({"alpha": alpha, **evaluate_mix(setup, args, device, alpha)})
            print(format_table(results).splitlines()[-1], flush=True)
        print(format_table(results))
    if args.output:
        write_outputs(args, results)
    if args.save:
        alpha = parse_alphas(args.save[0])[0]
        setup.model.load_state_dict(interpolate(start, end, alpha))
        clip_model.save_checkpoint(args.save[1], setup, wise_ft={"alpha": alpha, "pretrained": args.pretrained,
                                                                 "finetuned": args.finetuned})
        print(f"the mix of alpha {alpha} written to {args.save[1]}")
    return results


def write_outputs(args, results):
    files.write_json(args.output, {"pretrained": args.pretrained, "finetuned": args.finetuned,
                                        "data": args.data, "zeroshot": args.zeroshot, "results": results})
    print(f"results written to {args.output}")
    if args.data and args.zeroshot:
        figure = visualization.plot_wise_ft(results)
        print(f"curve drawn into {visualization.save_figure(figure, Path(args.output).with_suffix('.png'))}")


if __name__ == "__main__":
    run_script(main, "wise_ft.py")
