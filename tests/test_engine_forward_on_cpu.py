"""verl's real FSDPEngineWithLMHead.forward_step (non-packed path, device helpers at the CPU) on a tiny Qwen2.5-VL:

- with and without an image it runs once the Qwen2-VL fix is in, and fails without it (the fix matters);
- the ToR stage end to end with a worker-group double whose compute_log_prob is that engine forward: weights equal
  an independent computation (plain Hugging Face forward on prompts rebuilt without the image).

verl's apply_monkey_patch changes model classes process-wide, so each case runs in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SETUP = textwrap.dedent(
    """
    import json, sys, tempfile, torch, numpy as np
    import verl
    from transformers import AutoModelForImageTextToText
    from verl.models.transformers.monkey_patch import apply_monkey_patch
    from verl.utils import hf_processor
    from verl_tor import tiny
    from verl_tor.config import ToRConfig
    from verl_tor.stage import ToRStage, make_view_builder, rows_to_tensordict
    from verl_tor.testing import (EngineLogProbScorer, InMemoryKV, KVMeta, build_cpu_engine, build_verl_row,
                                  compute_sequence_log_probs, patch_engine_device_helpers)
    import verl_tor.qwen2_vl_fix as fix

    ckpt = tempfile.mkdtemp()
    tiny.save_tiny_checkpoint(ckpt)
    proc = hf_processor(ckpt)
    model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.float32).eval()

    def prompt(question, image):
        content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": question}]
        text = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                        tokenize=False)
        return proc(text=[text], images=[image] if image is not None else None, return_tensors="pt")["input_ids"][0]

    plan = []
    for p in range(2):
        prob = tiny.make_geometry_problem(p)
        for s in range(2):
            plan.append((prob["question"], prob["image"], torch.arange(3 + s + p) + 40 + 7 * s))
    plan.append(("What is two plus two?", None, torch.tensor([40, 41, 42])))
    rows = []
    for i, (q, img, resp) in enumerate(plan):
        row = build_verl_row(proc, prompt(q, img), resp, [img] if img is not None else None)
        row["uid"] = f"p{i // 2}"
        rows.append(row)
    keys = [f"k{i}" for i in range(len(rows))]
    """
)

FORWARD = SETUP + textwrap.dedent(
    """
    if sys.argv[1] == "unfixed":
        fix.revert_qwen2_vl_fix()
    patch_engine_device_helpers()
    apply_monkey_patch(model, use_remove_padding=False)
    engine = build_cpu_engine(model)
    from verl.utils import tensordict_utils as tu
    for name, row in (("image", rows[0]), ("text", rows[-1])):
        td = rows_to_tensordict([row])
        tu.assign_non_tensor(td, use_remove_padding=False, calculate_entropy=True, temperature=1.0)
        with torch.no_grad():
            _, out = engine.forward_step(td, loss_function=None, forward_only=True)
        print("OK", name, tuple(out["model_output"]["log_probs"].values().shape))
    """
)

STAGE = SETUP + textwrap.dedent(
    """
    # independent reference first (plain HF forward, before verl patches the classes)
    width = max(len(r["responses"]) for r in rows)
    old, noimg, ent, mask = (torch.zeros(len(rows), width) for _ in range(4))
    for i, (row, (q, img, resp)) in enumerate(zip(rows, plan)):
        n = len(resp)
        lp, h = compute_sequence_log_probs(model, row, with_entropy=True)
        old[i, :n], ent[i, :n], mask[i, :n] = lp[-n - 1:-1], h[-n - 1:-1], 1
        scratch = build_verl_row(proc, prompt(q, None), resp, None)
        noimg[i, :n] = compute_sequence_log_probs(model, scratch)[0][-n - 1:-1] if img is not None else old[i, :n]
    from verl_tor.ops import compute_tor_weights
    cfg = ToRConfig(enable=True, apply="loss", scope="group")
    index = np.array([r["uid"] for r in rows], dtype=object)
    # a text-only prompt has no S_t: its tokens take no part in the ranking of T_p
    has_image = torch.tensor([img is not None for _, img, _ in plan])[:, None] & mask.bool()
    want, _ = compute_tor_weights(
        ent, (old - noimg).abs() * mask, mask, cfg, index=index, step=5, sensitivity_mask=has_image
    )

    from verl_tor.testing import setup_cpu_engine
    store = InMemoryKV()
    store.kv_batch_put(keys, "train", fields=rows_to_tensordict(rows))
    scorer = EngineLogProbScorer(store, setup_cpu_engine(model))
    from verl.workers.utils.padding import response_from_nested
    from tensordict import TensorDict
    scorer(KVMeta(keys=keys, partition_id="train", extra_info={"calculate_entropy": True, "temperature": 1.0}))
    got = store.kv_batch_get(keys, "train", ["log_probs", "entropy", "response_mask"])
    fields = {"old_log_probs": response_from_nested(got["log_probs"], got["response_mask"]),
              "entropy": response_from_nested(got["entropy"], got["response_mask"])}
    store.kv_batch_put(keys, "train", fields=TensorDict(fields, batch_size=len(keys)))
    metrics = {}
    ToRStage(config=cfg, score=scorer, make_meta=KVMeta, build_view=make_view_builder(cfg, proc), store=store).run(
        KVMeta(keys=keys, partition_id="train"), metrics, {}, step=5)
    w = torch.nested.to_padded_tensor(store.kv_batch_get(keys, "train", ["tor_weights"])["tor_weights"], 0.0)
    old_engine = torch.nested.to_padded_tensor(fields["old_log_probs"], 0.0)
    print(json.dumps({
        "weights_equal": bool(torch.equal(w, want)),
        "old_log_prob_max_err": float((old_engine - old).abs().max()),
        "selected": int((w > 0).sum()),
        "no_image_frac": metrics["tor/no_image_frac"],
        "view_fields": sorted(scorer.calls[-1]["fields"]),
    }))
    """
)


def run(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def test_engine_forward_needs_the_fix_without_pixels():
    broken = run(FORWARD, "unfixed")
    assert broken.returncode != 0 and "OK image" in broken.stdout  # the with-image row is fine...
    assert "AttributeError" in broken.stderr and "mean" in broken.stderr  # ...the image-free one is not
    fixed = run(FORWARD, "fixed")
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert "OK image" in fixed.stdout and "OK text" in fixed.stdout


def test_stage_through_verl_engine_forward_matches_independent_weights():
    proc = run(STAGE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["old_log_prob_max_err"] < 1e-4  # verl's engine forward == plain HF forward on the same rows
    assert result["weights_equal"], result
    assert result["selected"] > 0 and abs(result["no_image_frac"] - 0.2) < 1e-6
    assert {"input_ids", "position_ids", "loss_mask"} <= set(result["view_fields"])
    assert "multi_modal_inputs" not in result["view_fields"]  # `remove`: no pixels in the image-free rows
