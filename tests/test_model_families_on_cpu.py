"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL (dense) through the same views, stage and verl engine forward.

Each family is a tiny real checkpoint (``verl_tor.tiny``, saved and loaded back through verl's ``hf_processor`` and
transformers' ``from_pretrained``). For each:

- the image-free view equals the prompt built from scratch without the image (ids, position ids, log-probs);
- verl's M-RoPE position ids of a row with an image follow the image grid, by a formula written out here;
- verl's ``FSDPEngineWithLMHead.forward_step`` (non-packed path, CPU) equals a plain Hugging Face forward with and
  without pixels, and the ToR stage through it gives the weights of an independent computation;
- verl's no-pixel bug exists exactly for the families routed through ``verl/models/transformers/qwen2_vl.py``
  (Qwen2-VL, Qwen2.5-VL): the fix runs there and never on Qwen3-VL, whose verl module has no such bug.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from verl_tor import tiny
from verl_tor.tools.in_process import build_verl_row, compute_sequence_log_probs
from verl_tor.views import VisionTokenIds, build_image_free_view

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "The figure shows a rectangle with its sides labelled. Find its area."
PROCESSORS = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}


@pytest.fixture(scope="module", params=tiny.FAMILIES)
def family(request, tmp_path_factory):
    from transformers import AutoModelForImageTextToText
    from verl.utils import hf_processor

    path = tiny.save_tiny_checkpoint(str(tmp_path_factory.mktemp(request.param)), family=request.param)
    processor = hf_processor(path)  # verl's loader: binds get_rope_index like in a real run
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    return {"name": request.param, "processor": processor, "model": model}


def prompt_ids(processor, image=None) -> torch.Tensor:
    content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": QUESTION}]
    text = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    return processor(text=[text], images=[image] if image is not None else None, return_tensors="pt")["input_ids"][0]


def test_checkpoint_loads_as_its_family(family, geometry_images):
    processor, model = family["processor"], family["model"]
    assert type(processor).__name__ == PROCESSORS[family["name"]] and model.config.model_type == family["name"]
    assert processor.image_processor.patch_size == (16 if family["name"] == "qwen3_vl" else 14)
    ids = VisionTokenIds.from_processor(processor)
    assert (prompt_ids(processor, geometry_images[0]) == ids.image_pad).sum() == 16  # 8×8 patches, merged 2×2
    text = processor.tokenizer.decode(prompt_ids(processor))
    # Qwen2/2.5-VL's template adds a default system turn, Qwen3-VL's does not
    assert ("You are a helpful assistant." in text) is (family["name"] != "qwen3_vl")


def test_image_free_view_equals_a_text_only_prompt(family, geometry_images):
    processor, model = family["processor"], family["model"]
    response = torch.tensor(processor.tokenizer.encode(" The area is \\boxed{12}."))
    row = build_verl_row(processor, prompt_ids(processor, geometry_images[0]), response, geometry_images[:1])
    view = build_image_free_view(row, "remove", VisionTokenIds.from_processor(processor), processor)
    scratch = build_verl_row(processor, prompt_ids(processor), response, None)
    for key in ("prompts", "input_ids", "position_ids"):
        assert torch.equal(view[key], scratch[key]), key
    assert torch.equal(view["position_ids"], torch.arange(len(scratch["input_ids"])).repeat(4, 1))  # text-only M-RoPE
    assert view["multi_modal_inputs"] == {} and torch.equal(view["responses"], response)
    n = len(response)
    lp_view = compute_sequence_log_probs(model, view)[0][-n - 1 : -1]
    torch.testing.assert_close(lp_view, compute_sequence_log_probs(model, scratch)[0][-n - 1 : -1])
    lp_image = compute_sequence_log_probs(model, row)[0][-n - 1 : -1]
    assert (lp_image - lp_view).abs().max() > 1e-4  # the image matters to the model


def test_mrope_position_ids_follow_the_image_grid(family, geometry_images):
    """verl's rows for a prompt with one image (merged grid 4×4), against M-RoPE written out: text positions count
    up; the image's 16 tokens share t = s (s = index of the first image token), h = s + row, w = s + column; the
    text after it resumes at s + 4 (one past the largest image position). Row 0 is verl's plain text position."""
    processor = family["processor"]
    ids = VisionTokenIds.from_processor(processor)
    prompt = prompt_ids(processor, geometry_images[0])
    row = build_verl_row(processor, prompt, torch.tensor([40, 41, 42]), geometry_images[:1])
    n_ids = len(row["input_ids"])
    s = int((row["input_ids"] == ids.image_pad).nonzero()[0])
    k = torch.arange(16)
    after = torch.arange(n_ids - s - 16) + s + 4
    t = torch.cat([torch.arange(s), torch.full((16,), s), after])
    h = torch.cat([torch.arange(s), s + k // 4, after])
    w = torch.cat([torch.arange(s), s + k % 4, after])
    assert torch.equal(row["position_ids"], torch.stack([torch.arange(n_ids), t, h, w]))


ENGINE = textwrap.dedent(
    """
    import json, sys, tempfile, torch, numpy as np
    import verl
    from transformers import AutoModelForImageTextToText
    from verl.utils import hf_processor
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import response_from_nested
    from tensordict import TensorDict
    from verl_tor import tiny
    from verl_tor.config import ToRConfig
    from verl_tor.ops import compute_tor_weights
    from verl_tor.stage import ToRStage, compute_row_identities, make_view_builder, rows_to_tensordict
    from verl_tor.tools.in_process import (EngineLogProbScorer, InMemoryKV, KVMeta, build_verl_row,
                                  compute_sequence_log_probs, setup_cpu_engine)
    import verl_tor.integration.fixes.qwen2_vl as fix

    family = sys.argv[1]
    ckpt = tempfile.mkdtemp()
    tiny.save_tiny_checkpoint(ckpt, family=family)
    proc = hf_processor(ckpt)
    model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.float32).eval()

    from verl_tor.tools.demo import encode_prompt

    def prompt(question, image):
        return encode_prompt(proc, {"question": question, "image": image})["input_ids"][0]

    plan = []
    for p in range(2):
        prob = tiny.make_geometry_problem(p)
        for s in range(2):
            plan.append((prob["question"], prob["image"], torch.arange(3 + s + p) + 40 + 7 * s))
    plan.append(("What is two plus two?", None, torch.tensor([40, 41, 42])))
    rows = []
    for i, (q, img, resp) in enumerate(plan):
        rows.append(build_verl_row(proc, prompt(q, img), resp, [img] if img is not None else None))
        rows[-1]["uid"] = f"p{i // 2}"
    keys = [f"k{i}" for i in range(len(rows))]

    # independent reference: plain Hugging Face forwards, before verl patches the model classes
    width = max(len(r["responses"]) for r in rows)
    old, noimg, ent, mask = (torch.zeros(len(rows), width) for _ in range(4))
    full = []
    for i, (row, (q, img, resp)) in enumerate(zip(rows, plan)):
        n = len(resp)
        lp, h = compute_sequence_log_probs(model, row, with_entropy=True)
        full.append(lp)
        old[i, :n], ent[i, :n], mask[i, :n] = lp[-n - 1:-1], h[-n - 1:-1], 1
        scratch = build_verl_row(proc, prompt(q, None), resp, None)
        noimg[i, :n] = compute_sequence_log_probs(model, scratch)[0][-n - 1:-1] if img is not None else old[i, :n]
    cfg = ToRConfig(enable=True, apply="loss", scope="group")
    index = np.array([r["uid"] for r in rows], dtype=object)
    # text-only rows have no S_t and take no part in T_p (the stage's rule: verl_tor.stage, recipes README FAQ)
    has_image = torch.tensor([img is not None for _, img, _ in plan])[:, None] & mask.bool()
    row_keys = compute_row_identities(rows_to_tensordict([{k: r[k] for k in ("prompts", "responses")} for r in rows]),
                                      len(rows))  # ties are broken by keys of each row's identity, as the stage does
    want, _ = compute_tor_weights(
        ent, (old - noimg).abs() * mask, mask, cfg, index=index, step=5, sensitivity_mask=has_image, row_keys=row_keys
    )

    engine = setup_cpu_engine(model)  # applies verl_tor's fix (when the bug is there) and verl's model patch
    calls = []
    fixed = fix._fixed_no_pixel_embeds
    fix._fixed_no_pixel_embeds = lambda *a, **k: calls.append(1) or fixed(*a, **k)

    def forward(row):
        td = rows_to_tensordict([row])
        tu.assign_non_tensor(td, use_remove_padding=False, calculate_entropy=True, temperature=1.0)
        with torch.no_grad():
            _, out = engine.forward_step(td, loss_function=None, forward_only=True)
        return out["model_output"]["log_probs"].values()

    result = {}
    fix.revert_qwen2_vl_fix()
    try:
        forward(rows[-1])
        result["unfixed_text"] = "OK"
    except Exception as exc:
        result["unfixed_text"] = repr(exc)
    fix.apply_qwen2_vl_fix()
    result["forward_err"] = {name: float((forward(rows[i]) - full[i]).abs().max()) for name, i in
                             (("image", 0), ("text", len(rows) - 1))}
    result["fix_calls_text"] = len(calls)

    store = InMemoryKV()
    store.kv_batch_put(keys, "train", fields=rows_to_tensordict(rows))
    scorer = EngineLogProbScorer(store, engine)
    scorer.compute_old_log_prob(keys)
    metrics = {}
    ToRStage(config=cfg, score=scorer, make_meta=KVMeta, build_view=make_view_builder(cfg, proc), store=store).run(
        KVMeta(keys=keys, partition_id="train"), metrics, {}, step=5)
    w = torch.nested.to_padded_tensor(store.kv_batch_get(keys, "train", ["tor_weights"])["tor_weights"], 0.0)
    result.update(weights_equal=bool(torch.equal(w, want)), selected=int((w > 0).sum()),
                  no_image_frac=metrics["tor/no_image_frac"], fix_calls_total=len(calls),
                  view_fields=sorted(scorer.calls[-1]["fields"]))
    print(json.dumps(result))
    """
)


@pytest.mark.parametrize("name", tiny.FAMILIES)
def test_engine_forward_stage_and_no_pixel_fix(name):
    """verl's monkey patch changes model classes process-wide: one fresh interpreter per family."""
    from verl_tor.integration.fixes.qwen2_vl import AFFECTED_MODEL_TYPES

    proc = subprocess.run(
        [sys.executable, "-c", ENGINE, name],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert max(result["forward_err"].values()) < 1e-4, result  # verl's engine == plain HF, with and without pixels
    assert result["weights_equal"] and result["selected"] > 0, result
    assert abs(result["no_image_frac"] - 0.2) < 1e-6  # 1 text-only row of 5
    assert {"input_ids", "position_ids", "loss_mask"} <= set(result["view_fields"])  # what verl's forward reads
    assert "multi_modal_inputs" not in result["view_fields"]  # `remove`: no pixels in the image-free rows
    if name in AFFECTED_MODEL_TYPES:  # verl's qwen2_vl module: broken without the fix, fixed by it
        assert "AttributeError" in result["unfixed_text"] and "mean" in result["unfixed_text"], result
        assert result["fix_calls_text"] >= 1 and result["fix_calls_total"] > result["fix_calls_text"]
    else:  # Qwen3-VL: verl's own no-pixel branch works, the fix never runs
        assert result["unfixed_text"] == "OK" and result["fix_calls_total"] == 0, result
