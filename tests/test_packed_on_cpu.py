"""verl's packed-sequence path (``use_remove_padding=true``) on CPU equals its padded path, for Qwen2.5-VL and Qwen3-VL.

Through verl's real ``FSDPEngineWithLMHead.forward_step`` on a tiny real model: one micro-batch of two rows with an
image (different lengths) and a text-only row, scored once padded (``(B, L)`` with an attention mask) and once
packed (one ``(1, total)`` row, position ids restarting per sequence, no mask). Compared on the same rows: the
old-policy log-probs, the full entropy, the top-p entropy (the engine hook's packed branch), the image-free
log-probs, and the ToR stage's S_t, T_r, T_p and weights; both also against an independent Hugging Face forward of
each row alone (so a packed mask that let sequences see each other would fail).

Qwen2.5-VL needs the CPU platform's route of verl's flash-attn attention to transformers' own
(``verl_tor.local.packed``): without it the packed forward raises verl's ``NameError`` (checked here, so the route's
reason stays true); Qwen3-VL needs nothing (verl does not patch its attention).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import json, sys, tempfile, torch
    import verl
    from transformers import AutoModelForImageTextToText
    from verl.utils import hf_processor
    from verl_tor import tiny
    from verl_tor.config import ToRConfig
    from verl_tor.stage import ToRStage, make_view_builder, rows_to_tensordict
    from verl_tor.tools.demo import encode_prompt
    from verl_tor.tools.in_process import (EngineLogProbScorer, InMemoryKV, KVMeta, build_verl_row,
                                           compute_sequence_log_probs, setup_cpu_engine)

    family = sys.argv[1]
    ckpt = tempfile.mkdtemp()
    tiny.save_tiny_checkpoint(ckpt, family=family)
    proc = hf_processor(ckpt)
    model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.float32).eval()

    def prompt(question, image):
        return encode_prompt(proc, {"question": question, "image": image})["input_ids"][0]

    rows = []
    for p in range(2):
        prob = tiny.make_geometry_problem(p)
        rows.append(build_verl_row(proc, prompt(prob["question"], prob["image"]), torch.arange(5 + 3 * p) + 40,
                                   [prob["image"]]))
    rows.append(build_verl_row(proc, prompt("What is two plus two?", None), torch.tensor([40, 41, 42]), None))
    for i, row in enumerate(rows):
        row["uid"] = f"u{i}"
    keys = [f"k{i}" for i in range(len(rows))]
    cfg = ToRConfig(enable=True, apply="loss", entropy="top_p", entropy_top_p=0.7)
    views = make_view_builder(cfg, proc)

    # independent reference: each row alone through the model's own forward, before verl patches the classes
    def response(values, row):
        return values[-len(row["responses"]) - 1:-1]
    reference = {"old": [], "full": [], "top_p": [], "noimg": []}
    for row in rows:
        lp, h = compute_sequence_log_probs(model, row, with_entropy=True)
        reference["old"].append(response(lp, row))
        reference["full"].append(response(h, row))
        reference["top_p"].append(response(compute_sequence_log_probs(model, row, True, True, 0.7)[1], row))
        view = views(row) if views.has_image(row) else None
        reference["noimg"].append(response(compute_sequence_log_probs(model, view)[0], view) if view else None)

    engine = setup_cpu_engine(model, use_remove_padding=True)  # verl's patch as a packed worker applies it
    result = {}
    if family != "qwen3_vl":  # verl's own attention for the packed path: the reason for verl_tor.local.packed
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLAttention
        import verl.models.transformers.qwen2_vl as verl_qwen2_vl
        routed = Qwen2_5_VLAttention.forward
        Qwen2_5_VLAttention.forward = routed.__wrapped_original__
        try:
            store = InMemoryKV()
            store.kv_batch_put(keys, "train", fields=rows_to_tensordict(rows))
            EngineLogProbScorer(store, engine, use_remove_padding=True).compute_old_log_prob(keys)
            result["verl_attention"] = "OK"
        except Exception as exc:
            result["verl_attention"] = f"{type(exc).__name__}: {exc}"
        finally:
            Qwen2_5_VLAttention.forward = routed
        result["routed"] = routed is verl_qwen2_vl.qwen2_vl_attn_forward and routed.__verl_tor__

    def score(packed):
        store = InMemoryKV()
        store.kv_batch_put(keys, "train", fields=rows_to_tensordict(rows))
        scorer = EngineLogProbScorer(store, engine, use_remove_padding=packed)
        out = {}
        scorer.compute_old_log_prob(keys)
        got = store.kv_batch_get(keys, "train", ["old_log_probs", "entropy"])
        out["old"], out["full"] = list(got["old_log_probs"].unbind()), list(got["entropy"].unbind())
        scorer.compute_old_log_prob(keys, entropy_top_p=0.7)  # the ToR trainer's flag: the hook's branch
        out["top_p"] = list(store.kv_batch_get(keys, "train", ["entropy"])["entropy"].unbind())
        view_rows = [views(r) for r in rows if views.has_image(r)]
        view_keys = [k for k, r in zip(keys, rows) if views.has_image(r)]
        store.kv_batch_put(view_keys, "noimg", fields=rows_to_tensordict(view_rows))
        scorer(KVMeta(keys=view_keys, partition_id="noimg", extra_info={"calculate_entropy": False}))
        free = store.kv_batch_get(view_keys, "noimg", ["log_probs"])["log_probs"].unbind()
        free = dict(zip(view_keys, [response(f, v) for f, v in zip(free, view_rows)]))
        out["noimg"] = [free.get(k) for k in keys]
        seen = {}
        stage = ToRStage(config=cfg, score=scorer, make_meta=KVMeta, build_view=views, store=store,
                         on_weights=lambda step, keys, tensors: seen.update(tensors))
        metrics = {}
        stage.run(KVMeta(keys=keys, partition_id="train"), metrics, {}, step=3)
        out["stage"] = {k: seen[k] for k in ("entropy", "sensitivity", "weights", "reasoning", "perception")}
        out["metrics"] = metrics
        return out

    padded, packed = score(False), score(True)

    def err(a, b):
        return max(float((x - y).abs().max()) for x, y in zip(a, b) if x is not None)

    for name in ("old", "full", "top_p", "noimg"):
        result[name] = {"packed_vs_padded": err(packed[name], padded[name]),
                        "packed_vs_reference": err(packed[name], reference[name]),
                        "padded_vs_reference": err(padded[name], reference[name])}
    a, b = padded["stage"], packed["stage"]
    result["stage"] = {
        "sensitivity_err": float((a["sensitivity"] - b["sensitivity"]).abs().max()),
        "entropy_err": float((a["entropy"] - b["entropy"]).abs().max()),
        "same_reasoning": bool(torch.equal(a["reasoning"], b["reasoning"])),
        "same_perception": bool(torch.equal(a["perception"], b["perception"])),
        "same_weights": bool(torch.equal(a["weights"], b["weights"])),
        "selected": int((b["weights"] > 0).sum()),
        "metrics_equal": {k: abs(padded["metrics"][k] - packed["metrics"][k]) < 1e-5 for k in padded["metrics"]},
    }
    result["top_p_below_full"] = int(sum(int((t < f - 1e-3).sum()) for t, f in zip(packed["top_p"], packed["full"])))
    result["image_effect"] = max(float((o - f).abs().max()) for o, f in zip(packed["old"], packed["noimg"])
                                 if f is not None)
    print(json.dumps(result))
    """
)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_packed_path_equals_padded_path(family):
    """verl's model patch is process-wide: one fresh interpreter per family."""
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, family],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # float32 on CPU: the same maths in a different layout (one (1, total) row against (B, L) with a mask)
    for name in ("old", "full", "top_p", "noimg"):
        assert max(result[name].values()) < 1e-4, (name, result)
    stage = result["stage"]
    assert stage["sensitivity_err"] < 1e-4 and stage["entropy_err"] < 1e-4, result
    assert stage["same_reasoning"] and stage["same_perception"] and stage["same_weights"], result
    assert stage["selected"] > 0 and all(stage["metrics_equal"].values()), result
    assert result["top_p_below_full"] > 0, result  # the top-p branch really ran
    assert result["image_effect"] > 1e-3, result  # the image-free pass really differs from the old one
    if family == "qwen3_vl":
        assert "verl_attention" not in result
    else:  # without the CPU platform's route, verl's packed attention needs flash-attn
        assert result["routed"], result
        assert result["verl_attention"] == "NameError: name '_flash_use_top_left_mask' is not defined", result


def test_route_is_registered_by_the_cpu_platform_only():
    """The local backend attaches the route when VERL_PLATFORM=cpu; a plain ``import verl`` leaves verl's function."""
    code = textwrap.dedent(
        """
        import json, verl
        import verl.models.transformers.qwen2_vl as m
        print(json.dumps(getattr(m.qwen2_vl_attn_forward, "__verl_tor__", False)))
        """
    )
    routed = {}
    for platform in ("cpu", ""):
        env = {**os.environ, "VERL_PLATFORM": platform, "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        routed[platform] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert routed == {"cpu": True, "": False}
