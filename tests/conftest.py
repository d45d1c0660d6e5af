"""Shared fixtures: a tiny real Qwen2.5-VL (processor + random model) saved and loaded like a hub checkpoint."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from verl_tor.tiny import save_tiny_checkpoint

    return save_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_qwen2_5_vl")), seed=0)


@pytest.fixture(scope="session")
def tiny_processor(tiny_checkpoint):
    from verl.utils import hf_processor

    processor = hf_processor(tiny_checkpoint)  # verl's loader: binds get_rope_index like in a real run
    assert processor is not None and hasattr(processor, "get_rope_index")
    return processor


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    import torch
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def geometry_images():
    from verl_tor.tiny import render_geometry_image

    return [render_geometry_image(seed)[0] for seed in range(3)]


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray instance, as verl's driver starts one (workers import verl, hence the plugin, themselves)."""
    import os

    import ray

    # workers unpickle actor classes defined in test modules, so they import from tests/ too
    path = os.pathsep.join(p for p in (os.path.dirname(__file__), os.environ.get("PYTHONPATH")) if p)
    # TransferQueue's controller and each storage unit reserve one logical CPU: 4 logical CPUs on 2 cores
    ray.init(
        num_cpus=4,
        object_store_memory=256 * 2**20,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": path}},
    )
    try:
        yield ray
    finally:
        ray.shutdown()


def pytest_collection_modifyitems(config, items):
    """The loop tests (one main_ppo run each, ~1 min) first, then the other ``slow`` ones, the rest after in their own
    order: with two xdist workers the long modules start at once and the short ones fill in, instead of a long module
    starting last."""
    items.sort(key=lambda item: (item.get_closest_marker("loop") is None, item.get_closest_marker("slow") is None))


@pytest.fixture(scope="session")
def cpu_dir(tmp_path_factory):
    """The loop tests' data: the figure task's problems (32 training, 8 validation) in a fresh folder (the model is
    the shipped figure reader). Each run writes under ``runs/<its experiment name>`` there."""
    from verl_tor.local.prepare import prepare

    out = str(tmp_path_factory.mktemp("cpu"))
    prepare(out, seed=0, n_train=32, n_val=8)
    return out
