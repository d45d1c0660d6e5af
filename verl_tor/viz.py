"""Token maps: which response tokens ToR picked, as a self-contained HTML page (no CDN, no JavaScript needed).

Each response token is a ``<span class="tok {reasoning|perception|both|none}">`` with a hover title giving its
entropy, |Δ log p| and weight; the header shows the prompt image (inline PNG) and the thresholds; two inline-SVG
histograms show the distribution of entropy and |Δ log p| over the batch with the selection cut marked (the paper's
Figure 5 view). Used by ``verl-tor demo``, ``verl-tor inspect`` and, every ``tor.log_token_maps`` steps, by the
training stage (``TrainingTokenMapWriter``).
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "TokenMapRollout",
    "classify_tokens",
    "render_token_map",
    "render_histogram_svg",
    "token_pieces",
    "TrainingTokenMapWriter",
]

CLASSES = ("both", "reasoning", "perception", "none")
COLORS = {"both": "#b15cff", "reasoning": "#ff8c42", "perception": "#3fa7f5", "none": "transparent"}


@dataclass
class TokenMapRollout:
    """One response to render. Per-token lists have the response's length (valid tokens only)."""

    tokens: list[str]
    entropy: list[float]
    sensitivity: list[float]
    weight: list[float]
    reasoning: list[bool]
    perception: list[bool]
    prompt: str = ""
    image_png: bytes | None = None
    title: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def classify_tokens(reasoning: Sequence[bool], perception: Sequence[bool]) -> list[str]:
    """Per token: ``both`` (T_r ∩ T_p), ``reasoning`` (T_r only), ``perception`` (T_p only) or ``none``."""
    out = []
    for r, p in zip(reasoning, perception):
        out.append("both" if r and p else "reasoning" if r else "perception" if p else "none")
    return out


def render_histogram_svg(
    values: Sequence[float], threshold: float | None, title: str, bins: int = 40, width: int = 460, height: int = 140
) -> str:
    """An inline SVG histogram of ``values`` with a red line at ``threshold`` (log-scaled counts)."""
    vals = torch.as_tensor(list(values), dtype=torch.float64)
    if vals.numel() == 0:
        label = f'<text x="8" y="20">{html.escape(title)}: no data</text>'
        return f'<svg class="hist" width="{width}" height="{height}">{label}</svg>'
    lo, hi = float(vals.min()), float(vals.max())
    if hi <= lo:
        hi = lo + 1.0
    counts = torch.histc(vals, bins=bins, min=lo, max=hi)
    scaled = torch.log1p(counts) / max(float(torch.log1p(counts.max())), 1e-9)
    pad, plot_h = 24, height - 40
    bar_w = (width - 2 * pad) / bins
    bars = []
    for i, s in enumerate(scaled.tolist()):
        h = s * plot_h
        bars.append(
            f'<rect x="{pad + i * bar_w:.1f}" y="{20 + plot_h - h:.1f}" width="{max(bar_w - 1, 1):.1f}" '
            f'height="{h:.1f}" fill="#7a8ca3"><title>{int(counts[i])}</title></rect>'
        )
    cut = ""
    if threshold is not None and lo <= threshold <= hi:
        x = pad + (threshold - lo) / (hi - lo) * (width - 2 * pad)
        cut = (
            f'<line x1="{x:.1f}" y1="16" x2="{x:.1f}" y2="{20 + plot_h}" stroke="#d62728" stroke-width="2"/>'
            f'<text x="{x + 3:.1f}" y="14" font-size="10" fill="#d62728">cut {threshold:.3g}</text>'
        )
    return (
        f'<svg class="hist" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">'
        f'<text x="{pad}" y="{height - 4}" font-size="11">{html.escape(title)} '
        f"(min {lo:.3g}, max {hi:.3g}; log counts)</text>{''.join(bars)}{cut}</svg>"
    )


_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:20px} h2{font-size:16px;margin:4px 0 10px}
.legend span{display:inline-block;padding:2px 8px;margin-right:8px;border-radius:3px}
.rollout{border:1px solid #ddd;border-radius:6px;padding:12px;margin:12px 0}
.head{display:flex;gap:12px;align-items:flex-start;margin-bottom:8px}
.rollout img{max-width:160px;border:1px solid #ccc}
.prompt{color:#555;white-space:pre-wrap;font-size:13px}
.response{font-family:ui-monospace,monospace;font-size:14px;line-height:1.9;white-space:pre-wrap}
.tok{border-radius:2px;padding:1px 0}
.tok.reasoning{background:#ffd2b0} .tok.perception{background:#bfe3ff} .tok.both{background:#e3c2ff}
.tok.none{color:#777} .tok.partial{display:inline-block;min-width:3px;height:1em;vertical-align:middle}
table.summary td,table.summary th{padding:2px 10px;text-align:left;font-size:13px}
.hists svg{margin-right:16px;border:1px solid #eee}
"""


def render_token_map(
    rollouts: Sequence[TokenMapRollout],
    thresholds: dict[str, float] | None = None,
    summary: dict[str, float] | None = None,
    title: str = "ToR token map",
    all_entropy: Sequence[float] | None = None,
    all_sensitivity: Sequence[float] | None = None,
) -> str:
    """A complete, self-contained HTML page for ``rollouts`` (one ``span.tok`` per response token)."""
    thresholds = thresholds or {}
    ent = list(all_entropy) if all_entropy is not None else [e for r in rollouts for e in r.entropy]
    sen = list(all_sensitivity) if all_sensitivity is not None else [s for r in rollouts for s in r.sensitivity]
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<div class='legend'>"
        + "".join(f"<span class='tok {c}'>{c}</span>" for c in ("reasoning", "perception", "both", "none"))
        + "</div>",
    ]
    if thresholds or summary:
        rows = {**{f"threshold: {k}": v for k, v in thresholds.items()}, **(summary or {})}
        parts.append("<table class='summary'>")
        parts += [f"<tr><th>{html.escape(k)}</th><td>{v:.4g}</td></tr>" for k, v in rows.items()]
        parts.append("</table>")
    parts.append("<div class='hists'>")
    parts.append(render_histogram_svg(ent, thresholds.get("entropy"), "entropy (nats)"))
    parts.append(render_histogram_svg(sen, thresholds.get("sensitivity"), "|Δ log p| (visual sensitivity)"))
    parts.append("</div>")
    for i, r in enumerate(rollouts):
        classes = classify_tokens(r.reasoning, r.perception)
        parts.append(f"<div class='rollout' data-index='{i}'>")
        parts.append(f"<h2>{html.escape(r.title or f'rollout {i}')}</h2>")
        parts.append("<div class='head'>")  # the prompt image next to the prompt text, the response below both
        if r.image_png:
            b64 = base64.b64encode(r.image_png).decode("ascii")
            parts.append(f"<img alt='prompt image' src='data:image/png;base64,{b64}'>")
        if r.prompt:
            parts.append(f"<div class='prompt'>{html.escape(r.prompt)}</div>")
        parts.append("</div>")
        spans = []
        for tok, cls, e, s, w in zip(r.tokens, classes, r.entropy, r.sensitivity, r.weight):
            tip = f"entropy {e:.3f} | |Δlog p| {s:.3f} | weight {w:.2f}"
            if not tok:  # the first bytes of a character completed by a later token: a thin hoverable mark
                cls, tip = f"{cls} partial", tip + " | part of a multi-byte character"
            spans.append(
                f"<span class='tok {cls}' data-entropy='{e:.4f}' data-sensitivity='{s:.4f}' "
                f"data-weight='{w:.2f}' title='{html.escape(tip, quote=True)}'>{html.escape(tok)}</span>"
            )
        parts.append(f"<div class='response'>{''.join(spans)}</div></div>")
    parts.append("</body></html>")
    return "".join(parts)


def token_pieces(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """The text each token adds to the decoded response; ``"".join(pieces) == tokenizer.decode(ids)``.

    Decoding tokens one by one breaks byte-level BPE: a character spread over several byte tokens (``°``, ``∠``,
    ``√``, CJK) comes out as ``\ufffd`` pieces. Here each token gets the text that becomes final once it is
    appended (incremental detokenization, as vLLM's detokenizer does), so the whole character lands on the token
    that completes it and the tokens before it get ``""``.
    """
    pieces: list[str] = []
    prefix, read = 0, 0  # text of ids[prefix:read] is final; ids[read:] is pending
    for end in range(1, len(ids) + 1):
        before = tokenizer.decode(ids[prefix:read])
        now = tokenizer.decode(ids[prefix:end])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            pieces.append(now[len(before) :])
            prefix, read = read, end
        else:
            pieces.append("")
    if len(ids) and read < len(ids):  # trailing incomplete bytes: show what the tokenizer gives for them
        pieces[-1] = tokenizer.decode(ids[prefix:])[len(tokenizer.decode(ids[prefix:read])) :]
    return pieces


def image_to_png_bytes(image: Any) -> bytes | None:
    """A PIL image (or None) -> PNG bytes, for the page header."""
    if image is None:
        return None
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def build_rollouts(
    tokenizer: Any,
    response_ids: Sequence[torch.Tensor],
    entropy: torch.Tensor,
    sensitivity: torch.Tensor | None,
    weights: torch.Tensor,
    reasoning: torch.Tensor,
    perception: torch.Tensor,
    prompts: Sequence[str] | None = None,
    images: Sequence[Any] | None = None,
    limit: int | None = None,
) -> list[TokenMapRollout]:
    """Padded (B, T) per-token tensors + token ids -> ``TokenMapRollout``s (first ``limit`` rows)."""
    out = []
    rows = range(len(response_ids) if limit is None else min(limit, len(response_ids)))
    for i in rows:
        ids = response_ids[i].tolist()
        n = len(ids)
        out.append(
            TokenMapRollout(
                tokens=token_pieces(tokenizer, ids),
                entropy=entropy[i, :n].tolist(),
                sensitivity=(sensitivity[i, :n] if sensitivity is not None else torch.zeros(n)).tolist(),
                weight=weights[i, :n].tolist(),
                reasoning=reasoning[i, :n].bool().tolist(),
                perception=perception[i, :n].bool().tolist(),
                prompt=prompts[i] if prompts else "",
                image_png=image_to_png_bytes(images[i]) if images and images[i] is not None else None,
                title=f"rollout {i}",
            )
        )
    return out


class TrainingTokenMapWriter:
    """Writes a token map every ``tor.log_token_maps`` steps into ``<default_local_dir>/tor_token_maps/``.

    Called by the ToR stage with the step's tensors; decodes a few rollouts with the trainer's tokenizer. When
    wandb is a logger, the page is also logged as a ``wandb.Html`` under ``tor/token_map``.
    """

    def __init__(
        self,
        every: int,
        n_rollouts: int,
        out_dir: str,
        tokenizer: Any,
        read_responses,
        use_wandb: bool,
        read_prompts=None,
    ):
        """``read_responses(keys) -> [response ids]``; ``read_prompts(keys) -> ([question text], [PIL image | None])``
        (optional: the page then shows each rollout's question and figure)."""
        self.every, self.n_rollouts, self.out_dir = every, n_rollouts, out_dir
        self.tokenizer, self.read_responses, self.use_wandb = tokenizer, read_responses, use_wandb
        self.read_prompts = read_prompts
        self.written: list[str] = []

    @classmethod
    def from_trainer(cls, trainer: Any) -> TrainingTokenMapWriter:
        import transfer_queue as tq

        cfg = trainer.config
        loggers = cfg.trainer.get("logger", [])
        loggers = [loggers] if isinstance(loggers, str) else list(loggers or [])
        out_dir = os.path.join(cfg.trainer.get("default_local_dir", "."), "tor_token_maps")

        def read_responses(keys: list[str], partition_id: str = "train") -> list[torch.Tensor]:
            data = tq.kv_batch_get(keys=keys, partition_id=partition_id, select_fields=["responses"])
            return list(data["responses"].unbind(0))

        processor = getattr(trainer, "processor", None)

        def read_prompts(keys: list[str], partition_id: str = "train") -> tuple[list[str], list[Any]]:
            fields = ["raw_prompt", "multi_modal_inputs"]
            data = tq.kv_batch_get(keys=keys, partition_id=partition_id, select_fields=fields)
            texts = [prompt_text(m) for m in _column(data, "raw_prompt", len(keys))]
            images = [
                first_image(mm, processor) if processor is not None else None
                for mm in _column(data, "multi_modal_inputs", len(keys))
            ]
            return texts, images

        return cls(
            every=trainer.tor_config.log_token_maps,
            n_rollouts=trainer.tor_config.log_token_maps_rollouts,
            out_dir=out_dir,
            tokenizer=trainer.tokenizer,
            read_responses=read_responses,
            use_wandb="wandb" in loggers,
            read_prompts=read_prompts,
        )

    def __call__(self, step: int, keys: list[str], tensors: dict[str, torch.Tensor | None], **_: Any) -> str | None:
        if self.every <= 0 or step % self.every != 0:
            return None
        chosen = keys[: self.n_rollouts]
        responses = self.read_responses(chosen)
        w = tensors["weights"]
        reasoning = tensors.get("reasoning")
        perception = tensors.get("perception")
        if reasoning is None:
            reasoning = torch.zeros_like(w, dtype=torch.bool)
        if perception is None:
            perception = torch.zeros_like(w, dtype=torch.bool)
        prompts, images = self.read_prompts(chosen) if self.read_prompts is not None else (None, None)
        rollouts = build_rollouts(
            self.tokenizer,
            responses,
            tensors["entropy"],
            tensors.get("sensitivity"),
            w,
            reasoning,
            perception,
            prompts=prompts,
            images=images,
        )
        for r, key in zip(rollouts, chosen):
            r.title = key
        mask = tensors["response_mask"].bool()
        sens = tensors.get("sensitivity")
        page = render_token_map(
            rollouts,
            thresholds={k: float(v) for k, v in (tensors.get("thresholds") or {}).items()},
            title=f"ToR token map, step {step}",
            all_entropy=tensors["entropy"][mask].tolist(),
            all_sensitivity=sens[mask].tolist() if sens is not None else [],
        )
        os.makedirs(self.out_dir, exist_ok=True)
        path = os.path.join(self.out_dir, f"step_{step:06d}.html")
        with open(path, "w", encoding="utf-8") as f:
            f.write(page)
        self.written.append(path)
        if self.use_wandb:
            try:
                import wandb

                if wandb.run is not None:
                    wandb.log({"tor/token_map": wandb.Html(page)}, step=step)
            except ImportError:
                pass
        return path


def _column(data: Any, name: str, n: int) -> list:
    """A field of a TransferQueue batch as a list (``[None] * n`` when no row has it)."""
    if name not in data.keys():
        return [None] * n
    value = data[name]
    return value.tolist() if hasattr(value, "tolist") else list(value)


def prompt_text(messages: Any) -> str:
    """The text of a chat prompt (verl's ``raw_prompt``: messages whose content is a string or a list of parts)."""
    if not messages:
        return ""
    parts = []
    for message in messages:
        content = message.get("content", "") if isinstance(message, dict) else str(message)
        if isinstance(content, str):
            parts.append(content)
        else:
            parts.extend(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return " ".join(p for p in parts if p).replace("<image>", "").strip()


def first_image(multi_modal_inputs: Any, processor: Any) -> Any:
    """The first image of a trajectory, rebuilt exactly from verl's ``multi_modal_inputs`` (``pixel_values`` as
    Qwen2-VL's image processor patchified and normalised them; ``image_grid_thw``), as a PIL image; ``None`` when
    the row has no image."""
    if not multi_modal_inputs or "pixel_values" not in multi_modal_inputs:
        return None
    from PIL import Image

    ip = processor.image_processor
    grid = multi_modal_inputs["image_grid_thw"]
    t, h, w = (int(x) for x in grid[0].tolist())
    m, p, tp = int(ip.merge_size), int(ip.patch_size), int(ip.temporal_patch_size)
    pixels = multi_modal_inputs["pixel_values"][: t * h * w].float()  # (patches, C * tp * p * p)
    channels = pixels.shape[1] // (tp * p * p)
    # the inverse of the processor's patchify: (t, tp, C, h/m, m, p, w/m, m, p) -> transpose(0,3,6,4,7,2,1,5,8)
    frames = pixels.reshape(t, h // m, w // m, m, m, channels, tp, p, p).permute(0, 6, 5, 1, 3, 7, 2, 4, 8)
    frame = frames.reshape(t * tp, channels, h * p, w * p)[0]
    mean = torch.tensor(ip.image_mean, dtype=frame.dtype).view(channels, 1, 1)
    std = torch.tensor(ip.image_std, dtype=frame.dtype).view(channels, 1, 1)
    rgb = ((frame * std + mean) / float(ip.rescale_factor)).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(rgb.permute(1, 2, 0).numpy())
