"""verl 0.9.1's Qwen2.5-VL no-pixel forward: broken without the fix, fixed at runtime, and the diff agrees.

verl's ``apply_monkey_patch`` replaces transformers' model forwards process-wide, so each case runs in a fresh
subprocess (it would otherwise change every other test's tiny model).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATCH = ROOT / "patches" / "0001-qwen2_vl-no-pixel-dummy-vision-forward.patch"

FORWARD = textwrap.dedent(
    """
    import sys, torch, verl
    from verl.models.transformers.monkey_patch import apply_monkey_patch
    from verl_tor import tiny
    import verl_tor.integration.fixes.qwen2_vl as fix
    mode = sys.argv[1]
    if mode == "unfixed":
        fix.revert_qwen2_vl_fix()
    elif mode == "fixed":
        assert fix.apply_qwen2_vl_fix()
    processor = tiny.build_tiny_processor()
    model = tiny.build_tiny_qwen2_5_vl(processor=processor)
    # verl's real patch (non-packed path, as verl's CPU engine tests: remove_padding needs flash-attn)
    apply_monkey_patch(model, use_remove_padding=False)  # Qwen2_5_VLModel.forward -> qwen2_vl_base_forward
    prob = tiny.make_geometry_problem(0)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prob["question"]}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    enc = processor(text=[text], images=[prob["image"]], return_tensors="pt")
    # with an image (verl's with-pixel branch)
    ids = enc["input_ids"]
    model(input_ids=ids, pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"],
          position_ids=torch.arange(ids.shape[1]).repeat(4, 1)[:, None])
    # without any pixels: the dummy vision forward
    text_ids = torch.tensor([[5, 6, 7, 8, 9]])
    out = model(input_ids=text_ids, position_ids=torch.arange(5).repeat(4, 1)[:, None])
    loss = out.log_probs.sum() if hasattr(out, "log_probs") and out.log_probs is not None else out.logits.sum()
    loss.backward()
    grad = model.model.visual.patch_embed.proj.weight.grad
    print("OK", "vision-in-graph" if grad is not None else "vision-not-in-graph")
    """
)


def run(mode: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", FORWARD, mode],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, "VERL_USE_EXTERNAL_PLUGINS": "none" if mode == "unfixed" else "auto"},
    )


def test_without_the_fix_verl_fails_on_text_only_input():
    proc = run("unfixed")
    assert proc.returncode != 0
    assert "AttributeError" in proc.stderr and "mean" in proc.stderr


def test_with_the_fix_both_branches_run_and_keep_the_vision_tower_in_the_graph():
    proc = run("fixed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK vision-in-graph" in proc.stdout


def test_plugin_applies_the_fix_on_import():
    code = (
        "import verl, verl.models.transformers.qwen2_vl as q\n"
        "print(getattr(q._get_input_embeds, '__verl_tor__', False))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.stdout.strip().endswith("True"), proc.stderr[-2000:]


def test_detection():
    import verl_tor.integration.fixes.qwen2_vl as fix

    fix.revert_qwen2_vl_fix()
    try:
        assert fix.is_qwen2_vl_bug_present()  # pinned verl 0.9.1 + transformers 5.x
    finally:
        fix.apply_qwen2_vl_fix()


@pytest.fixture
def patched_copy(tmp_path):
    import verl

    site = Path(verl.__file__).parent.parent
    (tmp_path / "verl" / "models" / "transformers").mkdir(parents=True)
    target = tmp_path / "verl" / "models" / "transformers" / "qwen2_vl.py"
    shutil.copy(site / "verl" / "models" / "transformers" / "qwen2_vl.py", target)
    return tmp_path, target


def test_patch_applies_to_the_installed_verl_and_matches_the_runtime_fix(patched_copy):
    import importlib.util

    import torch

    import verl_tor.integration.fixes.qwen2_vl as fix
    from verl_tor import tiny

    root, target = patched_copy
    assert shutil.which("patch"), "GNU patch is needed"
    dry = subprocess.run(
        ["patch", "-p1", "--dry-run", "-d", str(root), "-i", str(PATCH)], capture_output=True, text=True
    )
    assert dry.returncode == 0, dry.stdout + dry.stderr
    subprocess.run(["patch", "-p1", "-d", str(root), "-i", str(PATCH)], check=True, capture_output=True)
    source = target.read_text()
    assert fix.FIXED_LINE in source and fix.BUGGY_LINE not in source

    spec = importlib.util.spec_from_file_location("patched_qwen2_vl", target)
    patched = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(patched)
    fix.apply_qwen2_vl_fix()
    runtime = fix._module()._get_input_embeds
    assert runtime.__verl_tor__

    model = tiny.build_tiny_qwen2_5_vl().model  # verl calls it with the inner Qwen2_5_VLModel (has .visual)
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.manual_seed(0)
    a, _ = patched._get_input_embeds(model, ids, None)
    b, _ = runtime(model, ids, None)
    torch.testing.assert_close(a, b)
    # with pixels both are verl's own code
    processor = tiny.build_tiny_processor()
    enc = processor.image_processor(images=[tiny.render_geometry_image(0)[0]], return_tensors="pt")
    n = int(enc["image_grid_thw"].prod() // 4)
    ids = torch.full((1, n + 2), model.config.image_token_id)
    ids[0, 0], ids[0, -1] = 5, 6
    a, _ = patched._get_input_embeds(model, ids, None, enc["pixel_values"], None, enc["image_grid_thw"])
    b, _ = runtime(model, ids, None, enc["pixel_values"], None, enc["image_grid_thw"])
    torch.testing.assert_close(a, b)
