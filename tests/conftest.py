"""Tests that train a model or start a browser are marked slow, so that `pytest -m "not slow"`
is a quick check before a commit; the full suite (CI's, the README's command) runs them all.
A test is slow when marked so, or when it uses one of the module fixtures below, each of which
trains a model, starts torchrun or a browser.

The suite runs on every core (pytest-xdist, `-n auto` in pytest.ini; `-n 0` runs it in one
process). Much of its time is Python starting scripts -- importing torch, torchvision and open_clip
takes ~10 s of one core -- which a second core overlaps. Each worker computes on one thread, so two
workers never fight over a core (OpenMP threads that wait for a busy core make a step many times
slower). The tests of a module that share one of its expensive fixtures run in one worker, so
that the fixture is built once.

No test reaches Weights & Biases' servers or reads the user's W&B files: every test runs with W&B
in offline mode, without an API key, and with W&B's folders in a temporary folder. A test that
must work without the network asks for `offline`."""
import os
import socket

import pytest
import torch

SLOW_FIXTURES = {"learned_run",     # test_train: a run that learns
                 "torchrun_runs",   # test_distributed: runs under torchrun
                 "english",         # test_search_app: a trained model and its index
                 "browser",         # test_search_app: Chromium
                 "run",             # test_tensorboard_views: a run with its TensorBoard views
                 "wandb_run"}       # test_reporting: a run reported to W&B, and its resumed part
# Module fixtures that take seconds to build: a trained model, its export, a teacher.
SHARED_FIXTURES = SLOW_FIXTURES | {"learned", "trained", "exported", "accumulated_run", "tiny_run", "bert_run",
                                   "released_rn50", "rn50", "cli_run", "captioner", "chinese", "servers"}


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"        # and the scripts it starts
        torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)     # before xdist reads the groups from the items
def pytest_collection_modifyitems(items):
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if SLOW_FIXTURES & used:
            item.add_marker(pytest.mark.slow)
        if SHARED_FIXTURES & used:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


@pytest.fixture(scope="session", autouse=True)
def wandb_offline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wandb")
    with pytest.MonkeyPatch.context() as patch:
        for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
            patch.delenv(name, raising=False)
        patch.setenv("NETRC", str(folder / "no-netrc"))           # nor the user's ~/.netrc
        for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
            patch.setenv(name, str(folder / name.lower()))
        for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                            "WANDB_DISABLE_GIT": "true"}.items():
            patch.setenv(name, value)
        yield folder


@pytest.fixture
def offline(monkeypatch):
    """A machine without a network: HF_HUB_OFFLINE=1, and every connection refused."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refused(*args, **kwargs):
        raise OSError("the network was used")
    monkeypatch.setattr(socket.socket, "connect", refused)
    monkeypatch.setattr(socket.socket, "connect_ex", refused)

