"""What the tests of CLIPs with a Hugging Face text tower share (test_text_files.py,
test_chinese_clip.py): a run of one training step, and what a model makes of captions and images,
to compare after a round trip through a checkpoint."""
import torch

import evaluation
import export
import train


def train_one_step(model_name, data_index, out, run_name):
    """The last.pt of one train.py step of model_name on a data set, the run's folders under out."""
    train.main(["--model_name", str(model_name), "--data_dir", str(data_index), "--max_steps", "1", "--batch_size", "8",
                "--num_workers", "0", "--run_name", run_name, "--checkpoint_dir", str(out / "ckpt"),
                "--log_dir", str(out / "logs"), "--results_dir", str(out / "results"),
                "--tensorboard_pairs", "0", "--projector_pairs", "0"])
    return out / "ckpt" / run_name / "last.pt"


def features(setup, captions):
    """Token ids of the captions, and the model's normalised text and image features (of two random
    64 px images)."""
    setup.model.eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    tokens = setup.tokenizer(captions)
    with torch.no_grad():
        return tokens, setup.model.encode_text(tokens, normalize=True), setup.model.encode_image(images, normalize=True)


def evaluate_and_export(checkpoint, data, folder):
    """What evaluation.py (retrieval and zero-shot) and export.py (the open_clip folder and ONNX, with
    their checks) report of a checkpoint, on a generated data set."""
    results = evaluation.main(["--checkpoint", str(checkpoint), "--data", str(data["index"]),
                               "--zeroshot_dir", str(data["zeroshot"]), "--device", "cpu", "--num_workers", "0"])
    assert 0 <= results["retrieval"]["image_to_text"]["R@1"] <= 100 and "top1" in results["zeroshot"]
    report = export.main(["--checkpoint", str(checkpoint), "--output", str(folder), "--onnx",
                          "--check_data", str(data["index"]), "--check_images", "16"])
    assert report["open_clip_folder"]["passed"] and report["onnx"]["passed"]
    return report
