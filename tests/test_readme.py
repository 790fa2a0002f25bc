"""The README and docs/ are the manual: the settings table comes from the schema, every flag of
every script is named in them, and their commands and snippets run."""
import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import data_loader
import demo
import evaluation
import export
import minimal_clip
import search_app
import settings
import shards
import verify
import visualization
import wise_ft

ROOT = Path(__file__).resolve().parent.parent
# The README, then docs/ in the order of the README's map: the order their commands run in.
PAGES = [ROOT / "README.md"] + [ROOT / link for link in re.findall(
    r"^\| \[docs/\w+\.md\]\((docs/\w+\.md)\)", (ROOT / "README.md").read_text(), flags=re.M)]
MANUAL = "\n".join(page.read_text() for page in PAGES)
PARSERS = {"train.py": settings.build_parser, "evaluation.py": evaluation.build_parser,
           "visualization.py": visualization.build_parser, "demo.py": demo.build_parser,
           "data_loader.py": data_loader.build_parser, "shards.py": shards.build_parser,
           "verify.py": verify.build_parser, "wise_ft.py": wise_ft.build_parser,
           "search_app.py": search_app.build_parser, "export.py": export.build_parser,
           "minimal_clip.py": minimal_clip.build_parser}
# Commands the test only checks against their script's parser, and why they cannot run here.
NOT_RUN_HERE = {"setup.sh": "installs the environment the tests already run in",
                "demo.py": "takes minutes; tests/test_demo.py runs it with a small budget",
                "minimal_clip.py": "takes two minutes; tests/test_minimal_clip.py runs it with fewer epochs",
                "--pretrained laion2b": "downloads weights, and this machine has no network",
                "--distill_pretrained laion2b": "downloads the teacher's weights; no network here",
                "--pretrained mscoco_finetuned": "downloads CoCa's weights; no network here",
                "--pretrained chinese-clip": "downloads Chinese-CLIP's weights; no network here",
                "torchrun": "multi-GPU and multi-node runs; tests/test_distributed.py runs torchrun",
                "my-finetune": "needs your own fine-tuned run; tests/test_wise_ft.py runs wise_ft.py",
                "MUGE/lmdb": "Chinese-CLIP's download of MUGE; tests/test_data_loader.py trains on an "
                             "LMDB folder written as Chinese-CLIP's preprocessing writes it",
                "trtexec": "TensorRT needs an NVIDIA GPU; tests/test_export.py checks the ONNX files"}

# Commands that run until stopped (a server), so not in the sequence below: another test runs each
# as the README writes it, and is named here so that it cannot go without this test noticing.
RUN_BY = {"search_app.py serve": ("tests/test_search_app.py",
                                  "test_every_serve_command_of_the_readme_answers_a_request")}


def snippets(language):
    return re.findall(rf"```{language}\n(.*?)```", MANUAL, flags=re.S)


def commands():
    """Each command of the bash snippets, once, with continuation lines joined and comments
    dropped (the README repeats a few commands of docs/)."""
    seen = set()
    for block in snippets("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = " ".join(line.split("  #")[0].split())
            if line and line not in seen:
                seen.add(line)
                yield line


def script_and_args(command):
    words = shlex.split(command)
    for i, word in enumerate(words):
        if word.endswith(".py"):
            return Path(word).name, words[i + 1:]
    return None, words


def option_strings(parser):
    """Every option of a parser and of its subcommands (search_app.py index / serve)."""
    for action in parser._actions:
        yield from action.option_strings
        if isinstance(action, argparse._SubParsersAction):
            for subcommand in action.choices.values():
                yield from option_strings(subcommand)


def test_every_page_of_docs_is_in_the_readmes_map():
    assert sorted(PAGES[1:]) == sorted((ROOT / "docs").glob("*.md"))


def test_settings_table_is_generated_from_the_schema():
    table = re.search(r"<!-- train-settings:start -->\n(.*?)\n<!-- train-settings:end -->",
                      (ROOT / "docs/settings.md").read_text(), flags=re.S).group(1)
    assert table == settings.settings_markdown(), \
        "regenerate with: python -c 'import settings; print(settings.settings_markdown())'"


def documented_flags(text):
    """Every whole flag written in the text: `--eval` is not documented by `--eval_every`."""
    return set(re.findall(r"(?<![\w-])--[A-Za-z][\w-]*", text))


@pytest.mark.parametrize("script", sorted(PARSERS))
def test_every_flag_of_every_script_is_documented(script):
    flags = {option for option in option_strings(PARSERS[script]())
             if option.startswith("--") and option != "--help"}
    missing = sorted(flags - documented_flags(MANUAL))
    assert not missing, f"{script} flags missing from the README and docs/: {missing}"


def test_a_flag_is_documented_only_by_its_whole_name():
    assert documented_flags("use `--eval_every N` or --no-augment, not x--y") == {"--eval_every", "--no-augment"}


def test_every_command_in_the_readme_parses_with_its_script():
    for command in commands():
        script, args = script_and_args(command)
        if script in PARSERS:
            PARSERS[script]().parse_args(args)     # SystemExit on an unknown or malformed flag


def test_the_commands_run_by_another_test_are_run_there():
    for marker, (test_file, test_name) in RUN_BY.items():
        assert any(marker in command for command in commands()), f"no README command has {marker!r}"
        assert f"def {test_name}(" in (ROOT / test_file).read_text(), \
            f"{test_file} has no {test_name}, which runs the README's {marker!r} commands"


# Runs the README's commands in order (each script's main() with the command's arguments), then
# its Python snippets (each with its own globals, as pasted into one session), in ONE interpreter:
# a fresh Python per command would import torch and open_clip a dozen times (~5 s each here).
# How a script's __main__ reports errors is tested with each script.
RUNNER = """
import importlib, json, sys
commands, snippets = json.loads(sys.argv[1])
for script, args in commands:
    print(f"--- {script} {' '.join(args)}", flush=True)
    status = importlib.import_module(script[:-3]).main(args)
    if isinstance(status, int) and status != 0:
        sys.exit(f"{script} {' '.join(args)}: exit status {status}")
for number, code in enumerate(snippets):
    print(f"--- snippet {number}", flush=True)
    exec(code, {"__name__": "__main__"})
print("--- every command and snippet ran")
"""


@pytest.mark.slow
def test_the_readme_snippets_run(tmp_path):
    """Run the README's commands in order in an empty folder, then its Python snippets."""
    run = [script_and_args(command) for command in commands()
           if not any(marker in command for marker in [*NOT_RUN_HERE, *RUN_BY])]
    run = [(script, args) for script, args in run if script is not None]
    assert len(run) >= 6
    result = subprocess.run([sys.executable, "-c", RUNNER, json.dumps([run, snippets("python")])], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    assert result.stdout.rstrip().endswith("--- every command and snippet ran"), result.stdout[-2000:]
    assert (tmp_path / "results/shapes/similarity_heatmap.png").is_file()
    assert (tmp_path / "results/notebook/embedding_space.png").is_file()
