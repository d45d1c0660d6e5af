"""`verl-tor demo` end to end (small), its token map in a real headless browser, and the training-time writer."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from verl_tor.config import ToRConfig


class TokenSpans(HTMLParser):
    def __init__(self):
        super().__init__()
        self.spans: list[dict] = []
        self.images = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "span" and "tok" in (attrs.get("class") or "").split() and "data-weight" in attrs:
            self.spans.append(attrs)
        if tag == "img":
            self.images += 1


DEMO = """
import dataclasses, json, os, sys
from verl_tor.config import ToRConfig
from verl_tor.tools.demo import quiet_libraries, run_demo
cfg = ToRConfig(enable=True, log_token_maps_rollouts=2)
with quiet_libraries(os.path.join(sys.argv[1], "libraries.log")):  # as `verl-tor demo --one-step` runs it
    result = run_demo(cfg, out_dir=sys.argv[1], n_prompts=2, n=2, max_new_tokens=8, seed=0, progress=False)
print(json.dumps(dataclasses.asdict(result)))
"""

# Several demos in one process: with tor.entropy=top_p the demo scores with the model's own forward, so verl's
# process-wide model patch (which the engine forward needs, and which breaks a later `generate`) is never applied.
DEMO_VARIANTS = """
import dataclasses, json, os, sys
from verl_tor.config import ToRConfig
from verl_tor.tools.demo import run_demo
results = {}
for name, cfg in (
    ("advantage", ToRConfig(enable=True, entropy="top_p")),
    ("loss", ToRConfig(enable=True, entropy="top_p", apply="loss")),
    ("off", ToRConfig(enable=False, entropy="top_p")),
):
    result = run_demo(cfg, out_dir=os.path.join(sys.argv[1], name), n_prompts=2, n=2, max_new_tokens=8, progress=False)
    results[name] = dataclasses.asdict(result)
print(json.dumps(results))
"""


def run_python(code: str, out, stderr: list | None = None) -> list:
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=600, cwd=out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    if stderr is not None:
        stderr.append(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo in a process of its own, like the README command (it applies verl's process-wide model patch).
    Returns (result, config, the process's stderr)."""
    stderr: list[str] = []
    result = SimpleNamespace(**run_python(DEMO, tmp_path_factory.mktemp("demo"), stderr))
    return result, ToRConfig(enable=True, log_token_maps_rollouts=2), stderr[0]


def test_demo_output_is_not_drowned_in_library_notices(demo):
    """`verl-tor demo --one-step` printed five "engine is not available" warnings, verl's monkey-patch lines, its
    platform probe and a torch.fx note; they go to libraries.log now."""
    result, _, stderr = demo
    for noise in ("engine is not available", "Monkey patch", "No supported accelerator", "is_fx_tracing", "Loading"):
        assert noise not in stderr, stderr[-3000:]
    log = Path(result.html_path).with_name("libraries.log").read_text()
    assert "Monkey patch" in log  # kept, where a curious reader finds it


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """``tor.apply`` advantage and loss, and ``tor.enable=false``, on the same model and rollouts."""
    results = run_python(DEMO_VARIANTS, tmp_path_factory.mktemp("demo_variants"))
    return {name: SimpleNamespace(**r) for name, r in results.items()}


def test_demo_apply_loss_applies_the_weights_through_the_trainers_loss_wrapper(demo_runs):
    """`tor.apply=loss` used to print stock GRPO as ToR-GRPO. For verl's vanilla clipped loss, folding w_t into
    rollout_is_weights (apply=loss) and scaling the advantages (apply=advantage) give the same loss and gradient."""
    main, loss = demo_runs["advantage"], demo_runs["loss"]
    stock, tor = loss.losses["stock GRPO"], loss.losses["ToR-GRPO (tor)"]
    assert tor[1] != pytest.approx(stock[1], rel=1e-3)  # the gradient changed
    assert tor == pytest.approx(main.losses["ToR-GRPO (tor)"], rel=1e-4, abs=1e-6)
    assert stock == pytest.approx(main.losses["stock GRPO"], rel=1e-6)


def test_demo_with_tor_disabled_runs_stock_grpo_only(demo_runs):
    off, main = demo_runs["off"], demo_runs["advantage"]
    assert off.metrics == {} and off.html_path == ""
    assert set(off.losses) == {"stock GRPO"}
    assert off.losses["stock GRPO"] == pytest.approx(main.losses["stock GRPO"], rel=1e-6)
    assert off.scorer == "LocalLogProbScorer: train (4 rows)"  # no image-free pass
    assert main.scorer == "LocalLogProbScorer: train (4 rows), tor_noimg (4 rows)"


def classes_from_html(path: str) -> TokenSpans:
    parser = TokenSpans()
    parser.feed(Path(path).read_text(encoding="utf-8"))
    return parser


def test_demo_runs_and_reports(demo):
    result, cfg, _ = demo
    m = result.metrics
    assert m["tor/reasoning_frac"] == pytest.approx(m["tor/perception_frac"], abs=0.05)
    assert 0.29 <= m["tor/reasoning_frac"] <= 0.4  # ceil(0.3 N) of the valid tokens
    assert m["tor/sensitivity_mean/selected"] > m["tor/sensitivity_mean/rest"]
    assert m["tor/entropy_mean/selected"] > m["tor/entropy_mean/rest"]
    assert set(result.losses) == {"stock GRPO", "ToR-GRPO (tor)"}
    assert all(torch.isfinite(torch.tensor(v)).all() for v in result.losses.values())
    assert Path(result.html_path).with_name("metrics.json").exists()
    # both passes went through verl's FSDPEngineWithLMHead.forward_step: the old-policy one, then the image-free one
    assert result.scorer == "EngineLogProbScorer: train (4 rows), tor_noimg (4 rows)"


def test_token_map_has_one_span_per_token_with_consistent_classes(demo):
    result, cfg, _ = demo
    page = classes_from_html(result.html_path)
    assert page.images == 4  # 2 prompts x 2 responses rendered, each with its image
    assert len(page.spans) > 0
    for span in page.spans:
        cls, w = span["class"].split()[1], float(span["data-weight"])
        if cls in ("reasoning", "both"):
            assert w == cfg.reasoning_weight
        elif cls == "perception":
            assert w == cfg.perception_weight
        else:
            assert cls == "none" and w == 0.0


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def test_token_map_renders_in_headless_chromium(demo, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is required (scripts/dev.sh installs Debian's chromium)"
    result, _, _ = demo
    url = Path(result.html_path).resolve().as_uri()
    base = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    rendered = TokenSpans()
    rendered.feed(dom)
    expected = classes_from_html(result.html_path)
    assert len(rendered.spans) == len(expected.spans) > 0
    assert [s["class"] for s in rendered.spans] == [s["class"] for s in expected.spans]
    shot = tmp_path / "map.png"
    subprocess.run([*base, "--window-size=1000,900", f"--screenshot={shot}", url], capture_output=True, timeout=120)
    from PIL import Image

    image = Image.open(shot).convert("RGB")
    colors = image.getcolors(maxcolors=1 << 20)
    assert image.size == (1000, 900) and colors is not None and len(colors) > 50, "blank screenshot"


def _writer_and_tensors(out_dir, use_wandb=False):
    from verl_tor.viz import TrainingTokenMapWriter

    class Tok:
        def decode(self, ids):
            return "".join(f"<{i}>" for i in ids)

    responses = [torch.arange(5), torch.arange(3)]
    writer = TrainingTokenMapWriter(
        every=2,
        n_rollouts=2,
        out_dir=str(out_dir),
        tokenizer=Tok(),
        read_responses=lambda keys: responses,
        use_wandb=use_wandb,
    )
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    tensors = {
        "entropy": torch.rand(2, 5),
        "sensitivity": torch.rand(2, 5),
        "weights": torch.tensor([[1, 0.5, 0, 0, 1], [0, 1, 0, 0, 0.0]]),
        "reasoning": torch.tensor([[1, 0, 0, 0, 1], [0, 1, 0, 0, 0]], dtype=torch.bool),
        "perception": torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool),
        "response_mask": mask,
        "thresholds": {"entropy": 0.5, "sensitivity": 0.2},
    }
    return writer, tensors


def test_training_writer_fires_at_the_configured_interval(tmp_path):
    writer, tensors = _writer_and_tensors(tmp_path)
    written = [writer(step=s, keys=["a", "b"], tensors=tensors) for s in range(1, 6)]
    assert [w is not None for w in written] == [False, True, False, True, False]
    page = classes_from_html(written[1])
    assert [s["class"].split()[1] for s in page.spans] == [
        "both",
        "perception",
        "none",
        "none",
        "reasoning",
        "none",
        "reasoning",
        "none",
    ]


def test_token_pieces_keep_multibyte_characters_whole(tiny_processor):
    from verl_tor.viz import token_pieces

    tokenizer = tiny_processor.tokenizer
    text = "In △ABC, ∠A = 30°, so BC = 4√3 ≈ 6.93 (π/6) 三角形."
    ids = tokenizer.encode(text, add_special_tokens=False)
    one_by_one = [tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in one_by_one)  # the tiny BPE splits these characters into byte tokens
    pieces = token_pieces(tokenizer, ids)
    assert len(pieces) == len(ids)
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # leading bytes of a split character; the completing token carries the character
    for char in "△∠°√≈π三":
        assert char in pieces or any(char in p for p in pieces)
    # a response cut inside a character keeps one piece per token and still matches the decoded text
    cut = ids[: ids.index(next(i for i, p in zip(ids, pieces) if p == "")) + 1]
    assert "".join(token_pieces(tokenizer, cut)) == tokenizer.decode(cut)


def test_training_writer_logs_the_map_to_wandb(tmp_path, monkeypatch):
    """With wandb among verl's loggers the page goes to the run as HTML media (offline run, no login)."""
    import wandb  # a verl dependency

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    writer, tensors = _writer_and_tensors(tmp_path / "maps", use_wandb=True)
    run = wandb.init(project="verl_tor_test", dir=str(tmp_path), mode="offline")
    try:
        wandb.log({"tor/weight_mean": 0.3}, step=1)  # verl's tracking logs the previous step first
        path = writer(step=2, keys=["a", "b"], tensors=tensors)
    finally:
        run.finish()
    media = list(tmp_path.glob("wandb/offline-run-*/files/media/html/tor/token_map_*.html"))
    assert len(media) == 1, sorted(str(p) for p in tmp_path.rglob("*.html"))
    assert media[0].read_text(encoding="utf-8").count("<span class='tok") == Path(path).read_text(
        encoding="utf-8"
    ).count("<span class='tok")


@pytest.mark.parametrize("entropy", ["full", "top_p"])
def test_demo_and_inspect_rank_by_the_configured_entropy(tiny_model, tiny_processor, entropy):
    """`tor.entropy=top_p` reaches the local old-policy pass of `demo`/`inspect` (the trainer's flag), and the
    entropy the stage ranks by is the top-p truncated one, checked against a naive formula on the HF logits."""
    from verl_tor import tiny
    from verl_tor.tools.demo import build_batch, run_tor

    items = [tiny.make_geometry_problem(i) for i in range(2)]
    g = torch.Generator().manual_seed(0)
    vocab = len(tiny_processor.tokenizer) - 20
    responses = [[torch.randint(20, vocab, (6,), generator=g) for _ in range(2)] for _ in items]
    rows, keys = build_batch(tiny_processor, items, responses)
    cfg = ToRConfig(enable=True, entropy=entropy, entropy_top_p=0.5)
    _, _, tensors, _, _ = run_tor(tiny_model, tiny_processor, rows, keys, cfg, progress=False)

    top_p, full = [], []
    for row in rows:
        mm = {k: row["multi_modal_inputs"][k] for k in ("pixel_values", "image_grid_thw")}
        with torch.no_grad():
            logits = tiny_model(
                input_ids=row["input_ids"][None], position_ids=row["position_ids"].unsqueeze(1), **mm
            ).logits[0]
        n = len(row["responses"])
        probs = torch.softmax(logits[-n - 1 : -1].double(), dim=-1)  # (n, V): the response tokens' distributions
        full.append(-(probs * probs.log()).sum(-1))
        p, _ = probs.sort(dim=-1, descending=True)
        keep = (p.cumsum(-1) - p) < 0.5  # the smallest prefix with mass >= 0.5
        q = p * keep / (p * keep).sum(-1, keepdim=True)
        top_p.append(-(q * q.clamp_min(1e-300).log()).sum(-1))
    want = torch.stack(top_p if entropy == "top_p" else full).float()
    other = torch.stack(full if entropy == "top_p" else top_p).float()
    torch.testing.assert_close(tensors["entropy"], want, rtol=1e-4, atol=1e-4)
    assert (tensors["entropy"] - other).abs().max() > 1e-2


def test_local_log_probs_from_a_bf16_model_come_back_float32_on_cpu(tiny_checkpoint, tiny_processor):
    """`inspect` loads the model in bf16 (on a GPU when present); rows stay on the CPU as TransferQueue holds them."""
    from transformers import AutoModelForImageTextToText

    from verl_tor import tiny
    from verl_tor.tools.demo import build_batch
    from verl_tor.tools.in_process import compute_sequence_log_probs

    item = tiny.make_geometry_problem(0)
    (row,), _ = build_batch(tiny_processor, [item], [[torch.arange(20, 26)]])
    models = {
        dtype: AutoModelForImageTextToText.from_pretrained(tiny_checkpoint, dtype=dtype).eval()
        for dtype in (torch.float32, torch.bfloat16)
    }
    (lp32, h32), (lp16, h16) = (compute_sequence_log_probs(m, row, with_entropy=True) for m in models.values())
    for got in (lp16, h16):
        assert got.dtype == torch.float32 and got.device.type == "cpu" and torch.isfinite(got).all()
    torch.testing.assert_close(lp16, lp32, atol=0.15, rtol=0.05)
    torch.testing.assert_close(h16, h32, atol=0.15, rtol=0.05)
