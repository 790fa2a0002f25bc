"""demo.py runs the whole pipeline end to end (here with a small budget) and writes every output."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PLOTS = ["training_curves.png", "model_metrics.png", "similarity_heatmap.png", "relevance_maps.png",
         "retrieval_examples.png", "embedding_space.png", "zeroshot_confusion.png"]


@pytest.mark.slow
def test_demo_runs_end_to_end_and_writes_every_output(tmp_path):
    # Unknown flags go to train.py: a short run keeps the test quick.
    result = subprocess.run(
        [sys.executable, str(ROOT / "demo.py"), "--num_samples", "300", "--val_samples", "60",
         "--num_epochs", "1", "--batch_size", "32", "--num_workers", "0"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = tmp_path / "results/demo-en"
    for name in PLOTS + ["training_results.json", "eval_results.json", "embeddings/meta.json"]:
        assert (results / name).is_file(), name
    assert (tmp_path / "model-checkpoint/demo-en/best.pt").is_file()
    assert list((tmp_path / "logs/demo-en").glob("events.out.tfevents.*"))
    evaluation = json.loads((results / "eval_results.json").read_text())
    assert evaluation["num_images"] == 60 and "zeroshot" in evaluation
    assert "query: a large red circle on the left" in result.stdout
    assert "== summary" in result.stdout and "zero-shot top-1" in result.stdout


@pytest.mark.slow
def test_a_demo_with_a_captioner_prints_scores_and_draws_its_captions(tmp_path):
    # A few training steps: the plumbing of captions, not their quality (tests/test_coca.py); short
    # captions, since a decoder that has barely trained writes to the longest length.
    result = subprocess.run(
        [sys.executable, str(ROOT / "demo.py"), "--model_name", "tiny-coca-64", "--num_samples", "32",
         "--val_samples", "3", "--num_epochs", "1", "--batch_size", "32", "--num_workers", "0",
         "--projector_pairs", "0", "--tensorboard_pairs", "0", "--caption_max_length", "5",
         "--caption_num_beams", "2"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = tmp_path / "results/demo-en"
    captioning = json.loads((results / "eval_results.json").read_text())["captioning"]
    assert captioning["num_images"] == 3 and captioning["settings"]["max_length"] == 5
    first = captioning["captions"][0]
    assert f"wrote: {first['generated']}" in result.stdout and f"given: {first['references'][0]}" in result.stdout
    assert f"captions of 3 images: BLEU-4 {captioning['BLEU-4_x100']:.1f}" in result.stdout
    assert (results / "captions.png").is_file()
