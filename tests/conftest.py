"""Tests that train a model or start a browser are marked slow, so that `pytest -m "not slow"`
is a quick check before a commit; the full suite (CI's, the README's command) runs them all.
A test is slow when marked so, or when it uses one of the module fixtures below, each of which
trains a model, starts torchrun or a browser.

No test reaches Weights & Biases' servers or reads the user's W&B files: every test runs with W&B
in offline mode, without an API key, and with W&B's folders in a temporary folder. A test that
must work without the network asks for `offline`."""
import socket

import pytest

SLOW_FIXTURES = {"learned_run",     # test_train: a run that learns
                 "torchrun_runs",   # test_distributed: runs under torchrun
                 "english",         # test_search_app: a trained model and its index
                 "browser",         # test_search_app: Chromium
                 "run",             # test_tensorboard_views: a run with its TensorBoard views
                 "wandb_run"}       # test_reporting: a run reported to W&B, and its resumed part


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


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
