"""Sampling and accuracy of a figure reader on held-out problems, scored by verl's own Geometry3K reward.

``sample_responses`` generates (batched Hugging Face ``generate``; T=0 is greedy, T>0 true sampling: ``top_k=0``,
``top_p=1.0``, since ``generate``'s defaults may truncate; vision tokens banned, as verl's rollout never emits
them). ``evaluate_figure_reader`` scores them with ``verl.utils.reward_score.default_compute_score`` (the function
verl's reward manager calls) and reports accuracy, format rate and reward. ``image_view`` checks that the answers
depend on the figure: ``blank`` (a black image of the same size), ``none`` (the vision tokens removed from the
prompt, ToR's ``remove`` view).

    python -m verl_tor.figures.evaluate                        # the shipped checkpoint, 200 val problems
    python -m verl_tor.figures.evaluate --checkpoint DIR --data val.parquet --n 4
"""

from __future__ import annotations

import argparse
import io
import json
import re
import time
from collections.abc import Sequence
from typing import Any

import torch

from verl_tor.figures.task import (
    DATA_SOURCE,
    ERROR_CLASSES,
    READ_SLOTS,
    Problem,
    build_messages,
    classify_response,
    label_response,
    make_problem,
    split_seeds,
)

__all__ = [
    "IMAGE_VIEWS",
    "encode_prompts",
    "sample_responses",
    "score_response",
    "evaluate_figure_reader",
    "evaluate_val",
    "load_parquet_problems",
    "main",
]

IMAGE_VIEWS = ("image", "blank", "none")


def _view_images(problem: Any, image_view: str) -> list:
    if image_view not in IMAGE_VIEWS:
        raise ValueError(f"image_view={image_view!r}: choose one of {IMAGE_VIEWS}")
    if image_view == "none":
        return []
    if image_view == "blank":
        from PIL import Image

        return [Image.new("RGB", problem.image.size, (0, 0, 0))]
    return [problem.image]


def encode_prompts(processor: Any, problems: Sequence[Any], image_view: str = "image") -> dict:
    """Left-padded batch of the problems' chat prompts (``processor`` outputs: ids, mask, pixels, grids)."""
    images, texts = [], []
    for problem in problems:
        view = _view_images(problem, image_view)
        images += view
        messages = build_messages(problem.question, with_image=bool(view))
        texts.append(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    tokenizer = processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        return dict(processor(text=texts, images=images or None, padding=True, return_tensors="pt"))
    finally:
        tokenizer.padding_side = side


def sample_responses(
    model: Any,
    processor: Any,
    problems: Sequence[Any],
    n: int = 1,
    temperature: float = 1.0,
    seed: int = 0,
    max_new_tokens: int = 48,
    image_view: str = "image",
    batch_size: int = 64,
) -> list[list[torch.Tensor]]:
    """``n`` responses per problem, each the generated token ids up to and including the end-of-turn token.

    Args:
        problems: objects with ``image`` (PIL) and ``question`` (``Problem``).
        temperature: 0 = greedy (then ``n`` must be 1); otherwise sampling from the full distribution at this
            temperature.
        seed: seeds torch's global generator once before the first batch (deterministic for a given batching).
    Returns:
        ``[problem][sample]`` -> (Lr,) int64 tensor on the CPU.
    """
    from verl_tor.views import VisionTokenIds

    if temperature < 0:
        raise ValueError(f"temperature={temperature}: must be >= 0 (0 = greedy)")
    if temperature == 0 and n != 1:
        raise ValueError(f"n={n} with temperature=0: greedy decoding gives one response per problem; use n=1")
    tokenizer = processor.tokenizer
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    banned = [[t] for t in VisionTokenIds.from_processor(processor).all]
    device = next(model.parameters()).device
    # do_sample=False: greedy; otherwise the full distribution at T (generate's defaults may truncate with top_k)
    sampling = dict(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0) if temperature > 0 else {}
    sampling.setdefault("do_sample", False)
    torch.manual_seed(seed)
    out: list[list[torch.Tensor]] = []
    was_training = model.training
    model.eval()
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        enc = encode_prompts(processor, chunk, image_view)
        with torch.no_grad():
            generated = model.generate(
                **{k: v.to(device) for k, v in enc.items()},
                **sampling,
                max_new_tokens=max_new_tokens,
                num_return_sequences=n,
                bad_words_ids=banned,
                eos_token_id=eos,
                pad_token_id=pad,
            ).cpu()
        width = enc["input_ids"].shape[1]
        for i in range(len(chunk)):
            responses = []
            for j in range(n):
                response = generated[i * n + j, width:]
                ends = (response == eos).nonzero()
                responses.append(response[: int(ends[0]) + 1] if len(ends) else response)
            out.append(responses)
    model.train(was_training)
    return out


def score_response(text: str, ground_truth: str) -> dict[str, float]:
    """verl's reward for one decoded response (``default_compute_score``, Geometry3K) and its two parts."""
    from verl.utils.reward_score import default_compute_score
    from verl.utils.reward_score.geo3k import acc_reward, format_reward

    return {
        "score": float(default_compute_score(DATA_SOURCE, text, ground_truth)),
        "accuracy": acc_reward(text, ground_truth),
        "format": format_reward(text),
    }


def evaluate_figure_reader(
    model: Any,
    processor: Any,
    problems: Sequence[Any],
    temperature: float = 1.0,
    n: int = 1,
    seed: int = 0,
    image_view: str = "image",
    max_new_tokens: int = 48,
) -> dict[str, float]:
    """Mean accuracy / format / reward over ``n`` responses per problem, plus how often the sides were read right.

    ``sides_read``: share of responses in the answer format whose stated values read from the figure equal the
    figure's (the perception part alone; the rest of the errors are the arithmetic). ``correct`` / ``misread`` /
    ``miscalculated`` / ``malformed``: the shares of ``classify_response``'s classes (they sum to 1).
    """
    responses = sample_responses(model, processor, problems, n, temperature, seed, max_new_tokens, image_view)
    totals = {"accuracy": 0.0, "format": 0.0, "score": 0.0}
    classes = dict.fromkeys(ERROR_CLASSES, 0)
    formatted = sides_right = count = 0
    for problem, samples in zip(problems, responses):
        task = getattr(problem, "task", "area")
        for ids in samples:
            text = processor.tokenizer.decode(ids, skip_special_tokens=True)  # as verl's reward manager decodes
            scores = score_response(text, problem.answer)
            for key, value in scores.items():
                totals[key] += value
            count += 1
            classes[classify_response(text, problem, scores["accuracy"] == 1.0)] += 1
            kinds, parsed = label_response(text, task=task)
            if parsed:
                formatted += 1
                read = re.findall(r"\d+", "".join(c if k == "read" else " " for c, k in zip(text, kinds)))
                sides_right += read == [str(problem.values[slot]) for slot in READ_SLOTS[task]]
    result = {key: value / count for key, value in totals.items()}
    result["sides_read"] = sides_right / formatted if formatted else 0.0
    result.update({name: k / count for name, k in classes.items()})
    result["responses"] = float(count)
    return result


def evaluate_val(
    model: Any,
    processor: Any,
    problems: Sequence[Any] | str,
    temperature: float = 1.0,
    n: int = 4,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Greedy and sampled accuracy on a val set, for scripts (e.g. before/after RL).

    Args:
        problems: ``Problem``s, or the path of a val parquet written by ``write_figure_parquet``.
    Returns:
        ``{"greedy": evaluate_figure_reader(T=0), "sampled": evaluate_figure_reader(T=temperature, n)}``.
    """
    if isinstance(problems, str):
        problems = load_parquet_problems(problems)
    return {
        "greedy": evaluate_figure_reader(model, processor, problems, 0.0, 1, seed),
        "sampled": evaluate_figure_reader(model, processor, problems, temperature, n, seed),
    }


def load_parquet_problems(path: str, limit: int | None = None) -> list[Problem]:
    """Problems back from a parquet written by ``write_figure_parquet`` (image, question, answer, sides)."""
    import pandas as pd
    from PIL import Image

    frame = pd.read_parquet(path)
    problems = []
    for _, row in frame.head(limit).iterrows() if limit else frame.iterrows():
        info = row["extra_info"]
        image = Image.open(io.BytesIO(row["images"][0]["bytes"])).convert("RGB")
        problems.append(
            Problem(
                seed=int(info["seed"]),
                width=int(info["width"]),
                height=int(info["height"]),
                image=image,
                question=str(info["question"]),
                target=str(info["target"]),
                task=str(info.get("task", "area")),
                inside=int(info.get("inside", 0) or 0),
                distractor=int(info.get("distractor", 0) or 0),
            )
        )
    return problems


def main(argv: list[str] | None = None) -> int:
    from verl_tor.figures.model import FIGURE_READER_CHECKPOINT, load_figure_reader

    parser = argparse.ArgumentParser(description="Accuracy of a figure reader: greedy and sampled, with/without image")
    parser.add_argument("--checkpoint", default=FIGURE_READER_CHECKPOINT)
    parser.add_argument("--data", default=None, help="a val parquet (write_figure_parquet); default: val problems")
    parser.add_argument("--problems", type=int, default=200, help="held-out problems (without --data)")
    parser.add_argument("--seed", type=int, default=0, help="val split seed and sampling seed")
    parser.add_argument("--n", type=int, default=4, help="samples per problem at --temperature")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: as fast for a 1M model, robust to load)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    model, processor = load_figure_reader(args.checkpoint)
    if args.data:
        problems = load_parquet_problems(args.data, args.problems)
    else:
        problems = [make_problem(s) for s in split_seeds("val", args.problems, args.seed)]
    runs = [
        ("greedy", "image", 0.0, 1),
        (f"T={args.temperature:g}", "image", args.temperature, args.n),
        ("greedy, blank image", "blank", 0.0, 1),
        ("greedy, image removed", "none", 0.0, 1),
        (f"T={args.temperature:g}, blank image", "blank", args.temperature, args.n),
        (f"T={args.temperature:g}, image removed", "none", args.temperature, args.n),
    ]
    results = {}
    print(f"# checkpoint {args.checkpoint}; {len(problems)} problems; seed {args.seed}")
    print("| decoding | image | responses | accuracy | sides read right | format | verl reward |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, view, temperature, n in runs:
        r = evaluate_figure_reader(model, processor, problems, temperature, n, args.seed, view)
        results[name] = r
        print(
            f"| {name.split(',')[0]} | {view} | {int(r['responses'])} | {r['accuracy']:.3f} | {r['sides_read']:.3f} "
            f"| {r['format']:.3f} | {r['score']:.3f} |"
        )
    print(f"# {time.perf_counter() - t0:.1f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
