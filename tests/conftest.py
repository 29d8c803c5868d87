"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is much faster than two on a shared 2-core machine (a second
    thread only adds synchronisation). Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    """Every test run gets its own scorelab cache (precision decisions, feature classifiers), so a
    measurement taken on a loaded test machine never lands in the user's cache."""
    import os

    old = os.environ.get("SCORELAB_CACHE_DIR")
    os.environ["SCORELAB_CACHE_DIR"] = str(tmp_path_factory.mktemp("scorelab-cache"))
    yield
    if old is None:
        os.environ.pop("SCORELAB_CACHE_DIR", None)
    else:
        os.environ["SCORELAB_CACHE_DIR"] = old
