"""Tests that train a model or start a browser are marked slow, so that `pytest -m "not slow"`
is a quick check before a commit; the full suite (CI's, the README's command) runs them all.
A test is slow when marked so, or when it uses one of the module fixtures below, each of which
trains a model, starts torchrun or a browser."""
import pytest

SLOW_FIXTURES = {"learned_run",     # test_train: a run that learns
                 "torchrun_runs",   # test_distributed: runs under torchrun
                 "english",         # test_search_app: a trained model and its index
                 "browser",         # test_search_app: Chromium
                 "run"}             # test_tensorboard_views: a run with its TensorBoard views


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
