"""Teach the tiny Qwen2.5-VL to read its figure: deterministic two-stage SFT on CPU (design.md's measured recipe).

1. **Vision stage**: the vision tower alone, with a linear head on each merged image token (one per 28-px cell)
   that classifies "no digit" / 1-9. Plain SFT alone plateaus at "ignore the image" (side digits at entropy ln 9,
   design.md); this stage is what makes the model read.
2. **Full SFT** of the whole model on the target responses, the cell loss kept as an auxiliary loss (weight
   ``aux_weight``; the head reads the image tokens through a forward hook on ``model.model.visual``),
   ``text_only_frac`` of each batch text-only (the sides given in the question, no vision tokens) and
   ``blind_frac`` the figure's question without the figure (random sides), so that ToR's image-free view (the
   prompt with its vision tokens deleted) is in distribution. The budget is in steps, not seconds, and the learning
   rate stays constant after the warm-up: a decaying tail sharpens the model a lot (design.md), and RL needs a model
   that solves the task only partly at T=1.

Seeded and deterministic for a given torch version and thread count (``--threads``, default 1):

    python -m verl_tor.figures.sft --out-dir verl_tor/assets/figure_reader      # how the shipped one was made

The head is a training device only; the checkpoint is a plain ``Qwen2_5_VLForConditionalGeneration`` + processor.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from verl_tor.figures.task import (
    CELL,
    DISTRACTOR_CELL,
    HEIGHT_CELL,
    IMAGE_SIZE,
    INSIDE_CELL,
    TASKS,
    WIDTH_CELL,
    build_messages,
    build_task_target,
    make_problem,
    split_seeds,
)

__all__ = ["SFTConfig", "SFTResult", "train_figure_reader", "cell_labels", "main"]

GRID = IMAGE_SIZE // CELL  # 3 merged tokens a side
NO_DIGIT = 0


@dataclass(frozen=True)
class SFTConfig:
    """The SFT recipe; defaults made the shipped checkpoint."""

    seed: int = 0
    """Seeds the model's initialisation, the head, the problem pool and the batch order."""
    vision_steps: int = 300
    """Steps of stage 1 (vision tower + cell head only)."""
    sft_steps: int = 140
    """Steps of stage 2 (whole model, next-token loss + aux cell loss)."""
    batch_size: int = 32
    vision_lr: float = 2e-3
    sft_lr: float = 2e-3
    warmup_steps: int = 10
    """Linear warm-up of stage 2's learning rate."""
    final_lr_frac: float = 1.0
    """Stage 2's cosine schedule ends at this fraction of ``sft_lr``; 1.0 (default) keeps it constant after the
    warm-up. Measured on 100 held-out problems (seed 0): a cosine to 0.1 over 140 steps gave greedy 0.69 / T=1 0.11,
    constant 0.71 / 0.42, a cosine to 0.1 over 180 steps 1.00 / 0.64 and over 250 steps 1.00 / 0.85: the decay
    sharpens the model fast; constant leaves RL something to learn at T=1 and in greedy decoding."""
    aux_weight: float = 0.2
    """Weight of the cell-classification loss in stage 2."""
    text_only_frac: float = 0.2
    """Share of each stage-2 batch that is text-only (sides in the question, no image)."""
    blind_frac: float = 0.1
    """Share of each stage-2 batch that asks the figure's question with no figure (the prompt of ToR's
    ``image_view=remove``), the target's sides drawn at random: the model learns that without the image the sides
    are unknown but the answer format holds. Without it (design.md's recipe) the image-free view is out of
    distribution after the side digits: the template tokens that follow them ("*", "=", "}") change by up to 8 nats
    and fill the top of the |Δ log p| ranking (top-10% of S_t: 8% figure-derived tokens; with it: 67%, 16 problems
    x 4 samples, seed 0)."""
    pool_size: int = 2048
    """Distinct rendered problems to draw image rows from (preprocessed once: ~5 ms each)."""
    task: str = "area"
    """``verl_tor.figures.task.TASKS`` key: ``area`` (the shipped reader) or ``area_plus`` (issue 20's starting
    reader; its distractor digit is a cell class too: the tower reads every number, the language model learns which
    ones the question needs)."""
    select_target: float = 0.0
    """Early stop of stage 2 (0 = off): every ``select_every`` steps, greedy accuracy on ``select_n`` dev problems
    (SFT-split seeds after the pool's: never trained on, disjoint from the RL train/val splits); stage 2 stops at the
    first check at or above this. A rule, not a hand-picked checkpoint: how issue 20's starting reader lands in
    its 0.25-0.5 band deterministically."""
    select_every: int = 10
    select_n: int = 128
    threads: int = 1
    """torch CPU threads. Results are bit-identical for a fixed thread count, torch build and CPU kernel set; 1
    (default) loses little on 2 cores at these sizes, and much less than 2 threads do on a machine shared with other
    jobs."""

    def __post_init__(self) -> None:
        def fail(name: str, rule: str, fix: str) -> None:
            raise ValueError(f"SFTConfig.{name}={getattr(self, name)!r}: {rule}. Fix: {fix}.")

        for name in ("vision_steps", "sft_steps", "warmup_steps"):
            if getattr(self, name) < 0:
                fail(name, "must be >= 0", "give a number of steps (0 skips)")
        for name in ("batch_size", "pool_size", "threads"):
            if getattr(self, name) < 1:
                fail(name, "must be >= 1", "give a positive count")
        for name in ("text_only_frac", "blind_frac", "final_lr_frac"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                fail(name, "must be in [0, 1]", "give a fraction")
        if self.task not in TASKS:
            fail("task", f"unknown task (known: {sorted(TASKS)})", "choose one of them")
        if not 0.0 <= self.select_target <= 1.0:
            fail("select_target", "must be in [0, 1]", "give an accuracy (0 turns the early stop off)")
        if self.select_every < 1 or self.select_n < 1:
            fail("select_every", "select_every and select_n must be >= 1", "give positive counts")
        if self.aux_weight < 0:
            fail("aux_weight", "must be >= 0", "0 turns the auxiliary cell loss off")
        n_text, n_blind = round(self.batch_size * self.text_only_frac), round(self.batch_size * self.blind_frac)
        if self.batch_size - n_text - n_blind < 1:
            fail(
                "batch_size",
                f"with text_only_frac={self.text_only_frac} and blind_frac={self.blind_frac} no row has an image",
                "lower the two fractions (their sum must stay below 1) or raise batch_size",
            )


@dataclass
class SFTResult:
    model: Any
    processor: Any
    log: dict


def cell_labels(width: int, height: int, inside: int = 0, distractor: int = 0) -> torch.Tensor:
    """(GRID*GRID,) cell classes in raster order (the order of the merged image tokens): each label's digit in its
    cell, ``NO_DIGIT`` (0) elsewhere (``inside`` / ``distractor``: ``area_plus``'s two more labels; 0 = none)."""
    labels = torch.full((GRID * GRID,), NO_DIGIT, dtype=torch.long)
    labels[WIDTH_CELL[0] * GRID + WIDTH_CELL[1]] = width
    labels[HEIGHT_CELL[0] * GRID + HEIGHT_CELL[1]] = height
    if inside:
        labels[INSIDE_CELL[0] * GRID + INSIDE_CELL[1]] = inside
    if distractor:
        labels[DISTRACTOR_CELL[0] * GRID + DISTRACTOR_CELL[1]] = distractor
    return labels


class _VisionTap:
    """Forward hook on ``model.model.visual``: keeps the merged image tokens (one per cell) of the last forward."""

    def __init__(self, visual: torch.nn.Module):
        self.features: torch.Tensor | None = None
        self.handle = visual.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        # take the tensor now: get_image_features later replaces pooler_output by per-image splits
        self.features = output.pooler_output  # (images * cells, out_hidden), raster order per image

    def remove(self) -> None:
        self.handle.remove()


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(range(total), desc=desc, disable=not enabled, dynamic_ncols=True, leave=True)


def _lr_factor(step: int, cfg: SFTConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.sft_steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup_steps) / span))
    return cfg.final_lr_frac + (1 - cfg.final_lr_frac) * cosine


class _Batches:
    """Token sequences of the SFT mix, cached per (sides, with image): every image prompt is the same 40 tokens."""

    def __init__(self, processor: Any, task: str = "area"):
        self.processor = processor
        self.task = task
        question, self.text_question, _ = TASKS[task]
        self.tokenizer = processor.tokenizer
        self.image_pad = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.pad = self.tokenizer.pad_token_id
        cells = (IMAGE_SIZE // 14) ** 2 // 4  # merged tokens per image
        image_prompt = self._prompt_ids(build_messages(question))
        self.blind_prompt = self._prompt_ids(build_messages(question, with_image=False))
        # the chat template writes one <|image_pad|>; the processor expands it to one per merged token
        at = image_prompt.index(self.image_pad)
        self.image_prompt = image_prompt[:at] + [self.image_pad] * cells + image_prompt[at + 1 :]
        self._text_prompt: dict[tuple, list[int]] = {}
        self._response: dict[tuple, list[int]] = {}

    def text_prompt(self, values: tuple) -> list[int]:
        """Token ids of the text-only prompt for ``values`` = (w, h) or (w, h, inside), cached."""
        if values not in self._text_prompt:
            w, h, c = (*values, 0)[:3]
            question = self.text_question.format(w=w, h=h, c=c)
            self._text_prompt[values] = self._prompt_ids(build_messages(question, with_image=False))
        return self._text_prompt[values]

    def response(self, values: tuple) -> list[int]:
        """Token ids of the target response (+ end of turn) for ``values``, cached."""
        if values not in self._response:
            target = build_task_target(self.task, *values)[0] + self.tokenizer.eos_token
            self._response[values] = self.tokenizer(target, add_special_tokens=False)["input_ids"]
        return self._response[values]

    def _prompt_ids(self, messages: list[dict]) -> list[int]:
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def build(
        self,
        image_sides: list[tuple[int, int]],
        text_sides: list[tuple[int, int]],
        blind_sides: list[tuple[int, int]] = (),
    ) -> dict:
        """Right-padded batch: image rows first (their pixels are concatenated in this order), then text rows (sides
        in the question), then blind rows (the figure's question without the figure)."""
        seqs, prompt_lens = [], []
        for sides in image_sides:
            seqs.append(self.image_prompt + self.response(sides))
            prompt_lens.append(len(self.image_prompt))
        for sides in text_sides:
            seqs.append(self.text_prompt(sides) + self.response(sides))
            prompt_lens.append(len(self.text_prompt(sides)))
        for sides in blind_sides:
            seqs.append(self.blind_prompt + self.response(sides))
            prompt_lens.append(len(self.blind_prompt))
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), self.pad, dtype=torch.long)
        labels = torch.full((len(seqs), width), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (seq, n_prompt) in enumerate(zip(seqs, prompt_lens)):
            input_ids[i, : len(seq)] = torch.tensor(seq)
            attention_mask[i, : len(seq)] = 1
            labels[i, n_prompt : len(seq)] = input_ids[i, n_prompt : len(seq)]
        mm_token_type_ids = (input_ids == self.image_pad).long()  # what Qwen's processor returns (image = 1)
        return dict(input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=mm_token_type_ids), labels


def _build_pool(processor: Any, cfg: SFTConfig, progress: bool) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Pixel values (N, patches, patch_dim), cell labels (N, cells) and sides of ``pool_size`` SFT problems."""
    seeds = split_seeds("sft", cfg.pool_size, cfg.seed)
    pixels, labels, sides = [], [], []
    chunk = 128
    for start in _progress(math.ceil(len(seeds) / chunk), "render + preprocess figures", progress):
        problems = [make_problem(s, cfg.task) for s in seeds[start * chunk : (start + 1) * chunk]]
        out = processor.image_processor(images=[p.image for p in problems], return_tensors="pt")
        pixels.append(out["pixel_values"].reshape(len(problems), -1, out["pixel_values"].shape[-1]))
        labels += [cell_labels(p.width, p.height, p.inside, p.distractor) for p in problems]
        sides += [_values(p) for p in problems]
    return torch.cat(pixels), torch.stack(labels), sides


def _values(problem: Any) -> tuple:
    """The values a target response is built from: (w, h) for ``area``, (w, h, inside) for ``area_plus``."""
    return (
        (problem.width, problem.height) if problem.task == "area" else (problem.width, problem.height, problem.inside)
    )


def train_figure_reader(cfg: SFTConfig = SFTConfig(), progress: bool = True) -> SFTResult:
    """Run both stages; returns the trained model (eval mode), its processor and a log of losses/accuracies."""
    from verl_tor.figures.model import build_figure_processor, build_figure_reader

    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        t_start = time.perf_counter()
        processor = build_figure_processor(task=cfg.task)
        model = build_figure_reader(processor, seed=cfg.seed).train()
        gen = torch.Generator().manual_seed(cfg.seed)
        head = torch.nn.Linear(model.config.vision_config.out_hidden_size, 10)
        with torch.no_grad():  # seeded independently of the model's init
            head.weight.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(cfg.seed + 1))
            head.bias.zero_()
        pool = _build_pool(processor, cfg, progress)
        log: dict[str, Any] = {"config": dataclasses.asdict(cfg)}
        log["stage1"] = train_vision_stage(model, head, pool, gen, cfg, progress)
        log["stage1"]["held_out_cell_acc"] = measure_cell_accuracy(model, head, processor, cfg.seed, task=cfg.task)
        log["stage2"] = train_full_stage(model, head, processor, pool, gen, cfg, progress)
        model.eval()
        log["seconds"] = time.perf_counter() - t_start
    finally:
        torch.set_num_threads(threads)  # the caller's setting (tests share one process)
    return SFTResult(model=model, processor=processor, log=log)


def measure_cell_accuracy(
    model: Any, head: torch.nn.Module, processor: Any, seed: int = 0, n: int = 256, task: str = "area"
) -> dict:
    """The cell head's accuracy on ``n`` held-out (val split) figures: every cell, and the digit cells."""
    problems = [make_problem(s, task) for s in split_seeds("val", n, seed)]
    out = processor.image_processor(images=[p.image for p in problems], return_tensors="pt")
    labels = torch.stack([cell_labels(p.width, p.height, p.inside, p.distractor) for p in problems])  # (n, cells)
    with torch.no_grad():
        feats = model.model.visual(out["pixel_values"], grid_thw=out["image_grid_thw"]).pooler_output
        pred = head(feats).argmax(-1).reshape(labels.shape)
    digit = labels != NO_DIGIT
    return {
        "all_cells": float((pred == labels).float().mean()),
        "digit_cells": float((pred == labels)[digit].float().mean()),
    }


def train_vision_stage(
    model: Any, head: torch.nn.Module, pool: tuple, gen: torch.Generator, cfg: SFTConfig, progress: bool = True
) -> dict:
    """Stage 1: the vision tower and the cell head alone, on the pool's figures."""
    pixels, cells, _ = pool
    side = int(math.isqrt(pixels.shape[1]))  # patches a side
    visual = model.model.visual
    opt = torch.optim.AdamW([*visual.parameters(), *head.parameters()], lr=cfg.vision_lr, weight_decay=0.0)
    bar = _progress(cfg.vision_steps, "stage 1: vision tower reads the cells", progress)
    loss = acc = torch.zeros(())
    for _step in bar:
        idx = torch.randint(0, len(pixels), (cfg.batch_size,), generator=gen)
        grid = torch.tensor([[1, side, side]] * cfg.batch_size)
        feats = visual(pixels[idx].reshape(-1, pixels.shape[-1]), grid_thw=grid).pooler_output
        logits = head(feats)  # (B * cells, 10)
        loss = F.cross_entropy(logits, cells[idx].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        acc = (logits.argmax(-1) == cells[idx].reshape(-1)).float().mean()
        bar.set_postfix(loss=f"{loss.item():.3f}", cell_acc=f"{acc.item():.3f}")
    return {"loss": loss.item(), "cell_acc": acc.item()}


def train_full_stage(
    model: Any,
    head: torch.nn.Module,
    processor: Any,
    pool: tuple,
    gen: torch.Generator,
    cfg: SFTConfig,
    progress: bool = True,
) -> dict:
    """Stage 2: the whole model on the target responses + the aux cell loss, text-only rows mixed in."""
    pixels, cells, sides = pool
    side = int(math.isqrt(pixels.shape[1]))
    batches = _Batches(processor, cfg.task)
    n_values = 2 if cfg.task == "area" else 3
    dev = (
        [make_problem(s, cfg.task) for s in split_seeds("sft", cfg.pool_size + cfg.select_n, cfg.seed)[cfg.pool_size :]]
        if cfg.select_target > 0
        else []
    )
    checks: list[dict] = []
    opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=cfg.sft_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    n_text = round(cfg.batch_size * cfg.text_only_frac)
    n_blind = round(cfg.batch_size * cfg.blind_frac)
    n_image = cfg.batch_size - n_text - n_blind
    tap = _VisionTap(model.model.visual)
    lm_loss = aux_loss = torch.zeros(())
    try:
        bar = _progress(cfg.sft_steps, "stage 2: full SFT (+ aux cell loss)", progress)
        for _step in bar:
            idx = torch.randint(0, len(pixels), (n_image,), generator=gen)
            text_sides = torch.randint(1, 10, (n_text + n_blind, n_values), generator=gen).tolist()
            text_sides = [tuple(s) for s in text_sides]
            inputs, labels = batches.build([sides[i] for i in idx.tolist()], text_sides[:n_text], text_sides[n_text:])
            grid = torch.tensor([[1, side, side]] * n_image)
            logits = model(**inputs, pixel_values=pixels[idx].reshape(-1, pixels.shape[-1]), image_grid_thw=grid).logits
            lm_loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
            aux_loss = F.cross_entropy(head(tap.features), cells[idx].reshape(-1))
            loss = lm_loss + cfg.aux_weight * aux_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(lm=f"{lm_loss.item():.3f}", aux=f"{aux_loss.item():.3f}")
            if dev and (_step + 1) % cfg.select_every == 0:
                check = _greedy_check(model, processor, dev)
                checks.append({"step": _step + 1, **check})
                bar.write(f"stage 2 step {_step + 1}: dev greedy {check}")
                if check["accuracy"] >= cfg.select_target:
                    break
    finally:
        tap.remove()
    out = {"lm_loss": lm_loss.item(), "aux_loss": aux_loss.item()}
    if dev:
        out.update(checks=checks, stopped_at=checks[-1]["step"] if checks else 0)
    return out


def _greedy_check(model: Any, processor: Any, problems: list) -> dict:
    """Greedy accuracy on ``problems`` by verl's Geometry3K grader (the early-stop check) and the error classes."""
    from verl_tor.figures.evaluate import evaluate_figure_reader
    from verl_tor.figures.task import ERROR_CLASSES

    result = evaluate_figure_reader(model, processor, problems, temperature=0.0, n=1, max_new_tokens=64)
    return {key: round(result[key], 4) for key in ("accuracy", "sides_read", *ERROR_CLASSES[1:])}


def save_figure_reader(result: SFTResult, out_dir: str, command: str | None = None) -> str:
    """``save_pretrained`` of model + processor, and ``training.json`` (config, losses, wall time, versions)."""
    import transformers

    os.makedirs(out_dir, exist_ok=True)
    result.model.save_pretrained(out_dir)
    result.processor.save_pretrained(out_dir)
    info = {
        **result.log,
        "command": command,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    with open(os.path.join(out_dir, "training.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2, sort_keys=True)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the figure reader (two-stage SFT, CPU, deterministic)")
    parser.add_argument("--out-dir", required=True)
    for f in dataclasses.fields(SFTConfig):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    cfg = SFTConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SFTConfig)})
    result = train_figure_reader(cfg, progress=not args.no_progress)
    command = "python -m verl_tor.figures.sft " + " ".join(sys.argv[1:] if argv is None else argv)
    save_figure_reader(result, args.out_dir, command=command)
    print(json.dumps({k: v for k, v in result.log.items() if k != "config"}, indent=2))
    print(f"saved to {args.out_dir} ({result.log['seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
