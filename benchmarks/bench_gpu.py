"""ToR's costs on one GPU in one run: the entropy paths and a 7B/8B-shaped model's passes (issue 19).

Nothing but torch and transformers (and this repository's ``verl_tor.ops``, importable without verl): no verl, Ray
or vLLM, so it runs on any bare GPU box, in at most ~5 minutes on one H200. Sections, each guarded (a failure is
recorded in the JSON and the others still run):

1. ``exactness``: the exactness benchmark's row sets (``bench_entropy_exactness.py``) on the device, through both
   top-p methods: one-token nuclei exactly 0, the boundary grid, continuous rows against float64, the issue's row.
2. ``entropy``: 16,384 tokens x V = 151,936 bf16 logits of issue 19's two mixtures over N(0, 1) noise ("llm": 90 %
   of rows with one logit 16-22 above the noise plus 0-7 runner-ups 1-6 below it, 8 % with one logit 8-14 above,
   2 % noise x 0.5; "wide": the peaked rows only 12-20 above, so about half the rows need > 256 tokens): full
   entropy; float32 softmax; softmax + ``topk``; the top-p entropy before (today's escalation, kept in
   ``_entropy_reference.py``) at chunks 256 / 4096 and after (``verl_tor.ops``, both methods, several chunks);
   a naive full sort. Median ms, x full, peak extra memory (``torch.cuda.max_memory_allocated`` above the logits).
3. ``models``: a Qwen2.5-VL-7B-shaped and a Qwen3-VL-8B-shaped model built from their configs (sizes inline below)
   with random bf16 weights, ``sdpa``; 8 rows x (40 text + 256 image + 1,024 response) tokens: the old-policy pass
   (with the image, response log-probs), the image-free pass (``image_view=remove``), the old pass + full / top-p
   entropy of the response tokens (top-p before and after), forward + backward with gradient checkpointing. The
   random head gives flat rows (every row needs the full nucleus: the top-p worst case); ``head x8`` scales the
   output layer so rows are peaked like a trained model's.

    python benchmarks/bench_gpu.py [--out bench_gpu.json] [--sections exactness,entropy,models]
    python benchmarks/bench_gpu.py --tiny        # toy sizes (automatic without a GPU): the test suite runs this
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _entropy_reference, bench_entropy_exactness
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # verl_tor, from a checkout

import verl_tor.ops.entropy as entropy_module  # noqa: E402
from verl_tor.ops import compute_entropy_from_logits, compute_top_p_entropy_from_logits  # noqa: E402
from verl_tor.ops.entropy import TOP_P_METHODS  # noqa: E402

TOP_P = 0.95

# The published configs' key sizes (Qwen/Qwen2.5-VL-7B-Instruct and Qwen/Qwen3-VL-8B-Instruct config.json; transformers'
# own Qwen2_5_VLConfig / Qwen3VLConfig defaults are other sizes: 72B-like text, 3584-wide vision, so every size that
# matters is given here).
QWEN2_5_VL_7B = {
    "text_config": dict(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=128000,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
    ),
    "vision_config": dict(
        depth=32,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        out_hidden_size=3584,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31],
    ),
}
QWEN3_VL_8B = {
    "text_config": dict(
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=262144,
        rms_norm_eps=1e-6,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5e6,
            "mrope_section": [24, 20, 20],
            "mrope_interleaved": True,
        },
    ),
    "vision_config": dict(
        depth=27,
        hidden_size=1152,
        intermediate_size=4304,
        num_heads=16,
        out_hidden_size=4096,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        num_position_embeddings=2304,
        deepstack_visual_indexes=[8, 16, 24],
    ),
}
# --tiny: the same families at verl_tor.tiny's sizes (2 layers, hidden 64, vision depth 2), a 4,096-token vocabulary
TINY_TEXT = dict(
    vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=4096,
)  # fmt: skip
TINY = {
    "qwen2_5_vl": {
        "text_config": {
            **TINY_TEXT,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
        },
        "vision_config": dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[1],
        ),  # fmt: skip
    },
    "qwen3_vl": {
        "text_config": {
            **TINY_TEXT,
            "head_dim": 16,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5e6,
                "mrope_section": [2, 3, 3],
                "mrope_interleaved": True,
            },
        },
        "vision_config": dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0],
        ),  # fmt: skip
    },
}
# Qwen's special token ids (both families); a tiny vocabulary uses the last ids below its size instead.
SPECIAL_IDS = {"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
               "vision_end_token_id": 151653}  # fmt: skip


# ---------------------------------------------------------------------------------------------- helpers
def make_logits(kind: str, rows: int, vocab: int, device, dtype=torch.bfloat16, seed: int = 0) -> torch.Tensor:
    """Issue 19's mixtures: ``(rows, vocab)`` logits over N(0, 1) noise. "llm": 90 % of rows with one logit 16-22
    above the noise plus 0-7 runner-ups 1-6 below it, 8 % with one logit 8-14 above, 2 % noise x 0.5; "wide": the
    same with the peaked rows' logit 12-20 above."""
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g, device=device)
    u = torch.rand(rows, generator=g, device=device)
    peaked, mid, noise = u < 0.90, (u >= 0.90) & (u < 0.98), u >= 0.98
    lo, hi = (16.0, 22.0) if kind == "llm" else (12.0, 20.0)
    height = torch.where(
        peaked,
        lo + (hi - lo) * torch.rand(rows, generator=g, device=device),
        8.0 + 6.0 * torch.rand(rows, generator=g, device=device),
    )
    ids = torch.randint(0, vocab, (rows, 8), generator=g, device=device)  # (rows, 8): the peak, 7 runner-ups
    top = logits.gather(1, ids[:, :1]) + height[:, None]
    runners = top - (1.0 + 5.0 * torch.rand(rows, 7, generator=g, device=device))
    used = (torch.arange(7, device=device) < torch.randint(0, 8, (rows, 1), generator=g, device=device)) & peaked[
        :, None
    ]
    current = logits.gather(1, ids[:, 1:])
    logits.scatter_(1, ids[:, 1:], torch.where(used, torch.maximum(runners, current), current))
    logits.scatter_(1, ids[:, :1], torch.where((peaked | mid)[:, None], top, logits.gather(1, ids[:, :1])))
    logits[noise] *= 0.5
    return logits.to(dtype)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(fn, device, repeats: int) -> dict:
    """Median wall ms of ``fn()`` after one warm-up, and the peak memory it allocated above what was live (CUDA)."""
    fn()
    sync(device)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    extra = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else None
    del out
    return {"ms": statistics.median(times), "extra_peak_gib": extra}


def chunked(fn, logits: torch.Tensor, chunk: int) -> torch.Tensor:
    return torch.cat([fn(logits[i : i + chunk]) for i in range(0, logits.shape[0], chunk)])


def naive_sort_top_p(logits: torch.Tensor, top_p: float = TOP_P) -> torch.Tensor:
    """The obvious top-p entropy: a full sort of every row (float32 cumulative sums)."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    ordered = torch.sort(probs, dim=-1, descending=True).values
    keep = ordered.cumsum(dim=-1) - ordered < top_p
    q = torch.where(keep, ordered, 0.0)
    q = q / q.sum(dim=-1, keepdim=True)
    return -torch.where(q > 0, q * q.log(), 0.0).sum(dim=-1)


def softmax_topk(logits: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float32), k, dim=-1).values[:, -1]


# ---------------------------------------------------------------------------------------------- sections
def run_exactness(device, tiny: bool) -> dict:
    import bench_entropy_exactness as exact

    scale, vocab = (0.02, 2048) if tiny else (1.0, 151936)
    results = {}
    # "radix" sorts its short rows below _RADIX_MIN_VOCAB (16,384): every set but the Zipf rows would test that
    # fallback, so "radix, bins at every V" runs them all through the bit-pattern histograms.
    for label in (*TOP_P_METHODS, "radix, bins at every V"):
        method = label.split(",")[0]

        def on_device(logits, top_p, method=method, **kwargs):
            return compute_top_p_entropy_from_logits(logits.to(device), top_p, method=method, **kwargs).cpu()

        exact.compute_top_p_entropy_from_logits = on_device
        with _radix_bins_at_every_vocabulary(label.endswith("every V")):
            results[label] = _run_exactness_sets(exact, on_device, scale, vocab)
    return results


@contextlib.contextmanager
def _radix_bins_at_every_vocabulary(on: bool = True):
    """``"radix"`` through its histograms even below ``_RADIX_MIN_VOCAB``, where it would sort (tests, toy sizes)."""
    saved = entropy_module._RADIX_MIN_VOCAB
    entropy_module._RADIX_MIN_VOCAB = 0 if on else saved
    try:
        yield
    finally:
        entropy_module._RADIX_MIN_VOCAB = saved


def _run_exactness_sets(exact, on_device, scale: float, vocab: int) -> dict:
    """The exactness benchmark's row sets through ``on_device``: counts of rows off the definition."""
    ones, positive, _ = exact.one_token_rows(max(4, round(4000 * scale)))
    rows, ties, wrong = exact.boundary_rows(max(4, round(3000 * scale)))
    crows, moved = exact.continuous_rows(max(4, round(2000 * scale)))
    zrows, worst = exact.zipf_rows(max(4, round(32 * scale)), vocab)
    issue = on_device(torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log(), 0.8).item()
    return {
        "one_token_rows": ones,
        "one_token_rows_above_zero": positive,
        "boundary_rows": rows,
        "boundary_rows_with_a_tie": ties,
        "boundary_rows_not_exact": wrong,
        "continuous_rows": crows,
        "continuous_rows_off_by_1e-4": moved,
        "zipf_rows": zrows,
        "zipf_largest_error": worst,
        "issue_row_H": issue,
    }


def run_entropy(device, tiny: bool, repeats: int) -> dict:
    tokens, vocab = (128, 2048) if tiny else (16384, 151936)
    out = {"tokens": tokens, "vocab": vocab, "top_p": TOP_P, "rows": []}
    with _radix_bins_at_every_vocabulary(tiny):  # at toy sizes too, "radix" runs the path it takes at V = 151,936
        for kind in ("llm", "wide"):
            out["rows"] += _measure_entropy_paths(kind, make_logits(kind, tokens, vocab, device), device, repeats)
    return out


def _measure_entropy_paths(kind: str, logits: torch.Tensor, device, repeats: int) -> list[dict]:
    import _entropy_reference as before

    vocab = logits.shape[-1]
    probs = torch.softmax(logits.float(), dim=-1)
    reach = (torch.topk(probs, min(256, vocab)).values.sum(-1) >= TOP_P).float().mean().item()
    del probs
    reference = before.compute_top_p_entropy_from_logits(logits, TOP_P, chunk_size=4096)
    # the rows short of p after topk(256), alone: what each method's second phase costs per row
    probs = torch.softmax(logits.float(), dim=-1)
    short = (torch.topk(probs, min(256, vocab)).values.sum(-1) < TOP_P * probs.sum(-1)).nonzero().squeeze(1)
    del probs
    short_logits = logits[short]

    def finish_short_rows(fn, rows_at_once):
        def run():
            parts = [fn(short_logits[i : i + rows_at_once]) for i in range(0, len(short), rows_at_once)]
            return torch.cat(parts) if parts else reference[:0]

        return run

    def after(chunk, method):
        return lambda: compute_top_p_entropy_from_logits(logits, TOP_P, chunk, method=method)

    cases = {
        "full entropy (chunk 256)": lambda: compute_entropy_from_logits(logits),
        "full entropy (chunk 4096)": lambda: compute_entropy_from_logits(logits, chunk_size=4096),
        "softmax float32 (4096 rows at a time)": lambda: chunked(
            lambda x: torch.softmax(x, -1, dtype=torch.float32)[:, 0], logits, 4096
        ),
        "softmax + topk(256) (4096 rows at a time)": lambda: chunked(
            lambda x: softmax_topk(x, min(256, vocab)), logits, 4096
        ),
        "top-p before, chunk 256": lambda: before.compute_top_p_entropy_from_logits(logits, TOP_P),
        "top-p before, chunk 4096": lambda: before.compute_top_p_entropy_from_logits(logits, TOP_P, 4096),
        "top-p after, default (by device)": after(None, None),
        "top-p after, bracket, chunk 1024": after(1024, "bracket"),
        "top-p after, bracket, chunk 2048": after(2048, "bracket"),
        "top-p after, bracket, chunk 4096": after(4096, "bracket"),
        "top-p after, escalate, chunk 256": after(256, "escalate"),
        "top-p after, radix, chunk 1024": after(1024, "radix"),
        "top-p after, radix, chunk 2048": after(2048, "radix"),
        "top-p after, radix, chunk 4096": after(4096, "radix"),
        "naive full sort (2048 rows at a time)": lambda: chunked(naive_sort_top_p, logits, 2048),
        f"short rows only ({len(short)}): radix finish, 256 at a time": finish_short_rows(
            lambda x: entropy_module._finish_short_rows_radix(x, TOP_P), 256
        ),
        f"short rows only ({len(short)}): full sort, 256 at a time": finish_short_rows(naive_sort_top_p, 256),
    }
    rows, full_ms = [], None
    for name, fn in cases.items():
        row = {"mixture": kind, "path": name, "rows_reaching_p_in_top_256": reach}
        try:
            row.update(measure(fn, device, repeats))
            if name.startswith("top-p after"):
                row["max_abs_diff_vs_before"] = float((fn() - reference).abs().max())
            if name.startswith("short rows only") and len(short):
                row["us_per_short_row"] = row["ms"] * 1e3 / len(short)
                if "radix" in name:
                    row["max_abs_diff_vs_before"] = float((fn() - reference[short]).abs().max())
        except Exception as error:  # noqa: BLE001 - recorded, the other paths still run
            row["error"] = f"{type(error).__name__}: {error}"
        full_ms = row.get("ms") if full_ms is None else full_ms
        row["x_full"] = row["ms"] / full_ms if "ms" in row and full_ms else None
        rows.append(row)
    return rows


def build_model(family: str, tiny: bool, device, dtype):
    import transformers

    sizes = TINY[family] if tiny else (QWEN2_5_VL_7B if family == "qwen2_5_vl" else QWEN3_VL_8B)
    vocab = sizes["text_config"]["vocab_size"]
    ids = SPECIAL_IDS if vocab > 151656 else {k: vocab - 1 - i for i, k in enumerate(SPECIAL_IDS)}
    text_config = dict(sizes["text_config"])
    if tiny:  # Qwen's bos/eos ids are beyond a tiny vocabulary
        text_config.update(bos_token_id=vocab - 5, eos_token_id=vocab - 6, pad_token_id=vocab - 5)
    config_cls = transformers.Qwen2_5_VLConfig if family == "qwen2_5_vl" else transformers.Qwen3VLConfig
    config = config_cls(text_config=text_config, vision_config=dict(sizes["vision_config"]), **ids)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = transformers.AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval(), config, ids


def make_batch(config, ids, rows: int, text: int, image_tokens: int, response: int, device, with_image: bool):
    """``rows`` sequences [text | vision_start image_pad x image_tokens vision_end | response] (or without the
    vision block: the image-free view), random token ids below the special ones, and their pixels."""
    vision = config.vision_config
    g = torch.Generator().manual_seed(0)
    low = min(ids.values())
    prompt = torch.randint(0, low, (rows, text), generator=g)
    answer = torch.randint(0, low, (rows, response), generator=g)
    batch = {}
    if with_image:
        block = torch.full((rows, image_tokens), ids["image_token_id"])
        start = torch.full((rows, 1), ids["vision_start_token_id"])
        end = torch.full((rows, 1), ids["vision_end_token_id"])
        input_ids = torch.cat([prompt[:, :2], start, block, end, prompt[:, 2:], answer], dim=1)
        # Qwen3-VL's M-RoPE reads which tokens are image tokens (1) from the processor's mm_token_type_ids
        batch["mm_token_type_ids"] = (input_ids == ids["image_token_id"]).long().to(device)
        side = int(round((image_tokens * vision.spatial_merge_size**2) ** 0.5))  # patches per side
        patches = side * side
        features = 3 * vision.temporal_patch_size * vision.patch_size**2
        batch["pixel_values"] = torch.randn(rows * patches, features, generator=g).to(device, torch.bfloat16)
        batch["image_grid_thw"] = torch.tensor([[1, side, side]] * rows, device=device)
    else:
        input_ids = torch.cat([prompt, answer], dim=1)
    batch["input_ids"] = input_ids.to(device)
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    return batch, answer.to(device)


def response_logits(model, batch, response: int):
    """(rows, response, V) logits predicting the response tokens (the positions verl keeps)."""
    out = model(**batch, logits_to_keep=response + 1, use_cache=False)
    return out.logits[:, :-1]


def log_probs_of(logits, answer):
    return torch.cat(
        [
            torch.log_softmax(logits[i].float(), -1).gather(-1, answer[i, :, None]).squeeze(-1)[None]
            for i in range(logits.shape[0])
        ]
    )


def run_models(device, tiny: bool, repeats: int) -> dict:
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    shape = rows, text, image_tokens, response = (1, 8, 16, 16) if tiny else (8, 40, 256, 1024)
    out = {"rows": rows, "text_tokens": text, "image_tokens": image_tokens, "response_tokens": response, "models": {}}
    for family in ("qwen2_5_vl", "qwen3_vl"):
        try:
            out["models"][family] = _measure_model(family, device, tiny, repeats, dtype, shape)
        except Exception as error:  # noqa: BLE001 - recorded, the other family still runs
            out["models"][family] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return out


def _measure_model(family: str, device, tiny: bool, repeats: int, dtype, shape) -> dict:
    import _entropy_reference as before

    rows, text, image_tokens, response = shape
    result = {}
    t0 = time.perf_counter()
    model, config, ids = build_model(family, tiny, device, dtype)
    sync(device)
    result["build_s"] = time.perf_counter() - t0
    result["parameters_b"] = sum(p.numel() for p in model.parameters()) / 1e9
    with_image, answer = make_batch(config, ids, rows, text, image_tokens, response, device, True)
    image_free, _ = make_batch(config, ids, rows, text, image_tokens, response, device, False)
    head = model.lm_head.weight
    original_head = head.detach().clone()
    passes = {
        "old pass (with image, response log-probs)": lambda: log_probs_of(
            response_logits(model, with_image, response), answer
        ),
        "image-free pass": lambda: log_probs_of(response_logits(model, image_free, response), answer),
        "old pass + full entropy": lambda: _old_pass_plus(
            model, with_image, response, answer, compute_entropy_from_logits
        ),
        "old pass + top-p entropy, before": lambda: _old_pass_plus(
            model, with_image, response, answer, lambda x: before.compute_top_p_entropy_from_logits(x, TOP_P)
        ),
        "old pass + top-p entropy, after": lambda: _old_pass_plus(
            model, with_image, response, answer, lambda x: compute_top_p_entropy_from_logits(x, TOP_P)
        ),
    }
    for head_name, factor in (("random head", 1.0), ("head x8", 8.0)):
        with torch.no_grad():
            head.copy_(original_head * factor)
        table = result[head_name] = {}
        with torch.no_grad():
            for name, fn in passes.items():
                try:
                    table[name] = measure(fn, device, repeats)
                except Exception as error:  # noqa: BLE001
                    table[name] = {"error": f"{type(error).__name__}: {error}"}
        old = table.get("old pass (with image, response log-probs)", {}).get("ms")
        for row in table.values():
            row["x_old_pass"] = row["ms"] / old if old and "ms" in row else None
    with torch.no_grad():
        head.copy_(original_head)
    try:
        model.train()
        model.gradient_checkpointing_enable()

        def step():
            loss = -log_probs_of(response_logits(model, with_image, response), answer).mean()
            loss.backward()
            model.zero_grad(set_to_none=True)
            return loss.detach()

        result["forward + backward (checkpointing)"] = measure(step, device, max(1, repeats - 1))
    except Exception as error:  # noqa: BLE001
        result["forward + backward (checkpointing)"] = {"error": f"{type(error).__name__}: {error}"}
    return result


def _old_pass_plus(model, batch, response, answer, entropy_fn):
    logits = response_logits(model, batch, response)
    log_probs = log_probs_of(logits, answer)
    entropy = entropy_fn(logits.reshape(-1, logits.shape[-1]))
    return log_probs, entropy


# ---------------------------------------------------------------------------------------------- report
def print_tables(report: dict) -> None:
    entropy = report["sections"].get("entropy", {})
    if "rows" in entropy:
        print(f"\n## entropy paths: {entropy['tokens']:,} tokens x V = {entropy['vocab']:,}, p = {entropy['top_p']}\n")
        print("| mixture | path | ms | x full | extra peak GiB | max abs diff vs before |")
        print("| --- | --- | --- | --- | --- | --- |")
        for r in entropy["rows"]:
            ms = f"{r['ms']:.1f}" if "ms" in r else r.get("error", "")
            xf = f"{r['x_full']:.2f}" if r.get("x_full") else ""
            mem = f"{r['extra_peak_gib']:.2f}" if r.get("extra_peak_gib") is not None else "n/a"
            diff = f"{r['max_abs_diff_vs_before']:.1e}" if "max_abs_diff_vs_before" in r else ""
            per_row = f" ({r['us_per_short_row']:.1f} us a row)" if "us_per_short_row" in r else ""
            print(f"| {r['mixture']} | {r['path']}{per_row} | {ms} | {xf} | {mem} | {diff} |")
    models = report["sections"].get("models", {})
    if "models" in models:
        print(
            f"\n## passes: {models['rows']} rows x ({models['text_tokens']} text + {models['image_tokens']} image + "
            f"{models['response_tokens']} response) tokens\n"
        )
        print("| model | head | what | ms | x old pass |")
        print("| --- | --- | --- | --- | --- |")
        for family, result in models["models"].items():
            if "error" in result:
                print(f"| {family} | | error | {result['error']} | |")
                continue
            for head in ("random head", "head x8"):
                for name, row in result.get(head, {}).items():
                    ms = f"{row['ms']:.1f}" if "ms" in row else row.get("error", "")
                    x = f"{row['x_old_pass']:.2f}" if row.get("x_old_pass") else ""
                    print(f"| {family} | {head} | {name} | {ms} | {x} |")
            row = result.get("forward + backward (checkpointing)", {})
            ms = f"{row['ms']:.1f}" if "ms" in row else row.get("error", "")
            print(f"| {family} | random head | forward + backward (checkpointing) | {ms} | |")
    exact = report["sections"].get("exactness", {})
    if "escalate" in exact:
        print("\n## exactness on the device\n")
        print(
            "| method | one-token rows with H > 0 | boundary rows not exact | continuous off by > 1e-4 | issue row H |"
        )
        print("| --- | --- | --- | --- | --- |")
        for method, r in exact.items():
            print(
                f"| {method} | {r['one_token_rows_above_zero']} of {r['one_token_rows']} | "
                f"{r['boundary_rows_not_exact']} of {r['boundary_rows']} | "
                f"{r['continuous_rows_off_by_1e-4']} of {r['continuous_rows']} | {r['issue_row_H']:.5f} |"
            )
    for name, section in report["sections"].items():
        if isinstance(section, dict) and "error" in section:
            print(f"\n# section {name} failed: {section['error']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="toy sizes (automatic without a GPU)")
    parser.add_argument("--sections", default="exactness,entropy,models")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the JSON report here (also printed last)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tiny = args.tiny or device == "cpu"
    repeats = 1 if tiny else args.repeats
    import transformers

    report = {
        "command": " ".join([sys.executable, *sys.argv]),
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "tiny": tiny,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "sections": {},
    }
    runners = {
        "exactness": functools.partial(run_exactness, device, tiny),
        "entropy": functools.partial(run_entropy, device, tiny, repeats),
        "models": functools.partial(run_models, device, tiny, repeats),
    }
    print(f"# bench_gpu: {report['command']}\n# {report['device']}, torch {report['torch']}, tiny={tiny}")
    for name in args.sections.split(","):
        t0 = time.perf_counter()
        try:
            report["sections"][name] = runners[name]()
        except Exception as error:  # noqa: BLE001 - recorded; the next section still runs
            report["sections"][name] = {
                "error": f"{type(error).__name__}: {error}",
                "traceback": traceback.format_exc(),
            }
        report["sections"][name + "_s"] = time.perf_counter() - t0
        print(f"# section {name}: {report['sections'][name + '_s']:.1f} s", flush=True)
    print_tables(report)
    text = json.dumps(report, indent=1, default=str)
    if args.out:
        Path(args.out).write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
