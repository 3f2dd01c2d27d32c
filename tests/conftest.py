"""Shared fixtures: tiny random models built from configs (no downloads), on CPU, deterministic."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Under pytest-xdist every worker is a process of its own: one thread each, so workers do not oversubscribe the cores.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_backbone():
    from lit_ovis.models.backbone import build_backbone

    return build_backbone("tiny").eval()


@pytest.fixture(scope="session")
def tiny_text_encoder():
    from lit_ovis.models.text_encoder import build_text_encoder

    return build_text_encoder("tiny", max_sequence_length=32)


@pytest.fixture(scope="session")
def tiny_vae():
    from lit_ovis.models.vae import build_vae

    return build_vae("tiny")


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_backbone, tiny_text_encoder, tiny_vae):
    from lit_ovis.cli.export import build_pipeline
    from lit_ovis.sampling.generate import SamplingConfig

    return build_pipeline(tiny_backbone, tiny_text_encoder, tiny_vae, SamplingConfig())


@pytest.fixture
def one_thread():
    """Tiny models are dominated by thread overhead on a shared 2-core machine: run the test on one thread."""
    from helpers import torch_threads

    with torch_threads(1):
        yield


DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE")


@pytest.fixture(autouse=True)
def _no_leaked_distributed_env():
    """An in-process Lightning run that initialises torch.distributed writes MASTER_PORT & co. into
    os.environ; multi-process tests launched afterwards would inherit that fixed port (EADDRINUSE while the
    old socket lingers). Each test starts and ends with the launcher variables it found."""
    saved = {k: os.environ.get(k) for k in DIST_ENV}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
