import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter, set before they are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def srv():
    """A tiny-model server (logquant policy) for a test module; modules that need other
    settings define their own `srv`."""
    from server_util import RunningServer, tiny_core_factory

    with RunningServer(tiny_core_factory()) as server:
        yield server.wait_ready()


@pytest.fixture(scope="module")
def client(srv):
    from server_util import openai_client

    return openai_client(srv)


@pytest.fixture(scope="module")
def model_and_tokenizer():
    """The real default model, loaded once per test module (tests may change its attention)."""
    from logquant.models import DEFAULT_MODEL, load_model

    return load_model(DEFAULT_MODEL)
