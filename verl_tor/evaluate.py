"""Evaluation of a trained checkpoint on the paper's benchmarks: rule-based answer matching, no paid judge.

Protocol (stated once, used for every benchmark):
- prompt: the benchmark's question (+ choices as ``A. ...`` lines) with the image, and the training instruction
  (reason in <think> </think>, final answer in \\boxed{}); chat template of the checkpoint's processor;
- decoding: greedy (``--k 1``, temperature 0) and avg@k (``--k K``, temperature 1.0, top-p 1.0): the mean accuracy
  over K samples per question;
- answer extraction: the last ``\\boxed{...}`` (balanced braces); if none, the last line's final token;
- matching: multiple choice by letter (``A``/``(A)``/``A.``) or by the choice's text; numbers with relative
  tolerance 1e-2 (also fractions ``a/b`` and ``\\frac{a}{b}``, percentages and units stripped); otherwise exact match
  after normalisation (case, spaces, ``$``, ``\\text{}``, trailing period);
- data: local parquet files, one per benchmark (``mathverse.parquet``, ``mathvision.parquet``, ``mathvista.parquet``,
  ``wemath.parquet``, ``hallusionbench.parquet``) with columns ``question``, ``answer``, ``image`` (``{"bytes": ...}``
  or bytes or a path) and optional ``choices`` (list of strings).

Backends: vLLM on GPU (imported lazily), and Hugging Face ``generate`` (runs on CPU with the tiny test model).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

BENCHMARKS = ("mathverse", "mathvision", "mathvista", "wemath", "hallusionbench")
INSTRUCTION = (
    "You FIRST think about the reasoning process as an internal monologue and then provide the final answer. "
    "The reasoning process MUST BE enclosed within <think> </think> tags. The final answer MUST BE put in \\boxed{}."
)
LETTERS = "ABCDEFGHIJ"


# ---------------------------------------------------------------------- answer matching
def extract_answer(text: str) -> str:
    """The last balanced ``\\boxed{...}`` of ``text``; else the last token of its last non-empty line."""
    start = text.rfind("\\boxed{")
    if start >= 0:
        i, depth = start + len("\\boxed{"), 1
        j = i
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        if depth == 0:
            return text[i : j - 1].strip()
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1].split()[-1] if lines else ""


def normalize(text: str) -> str:
    text = re.sub(r"\\text\{([^}]*)\}", r"\1", text)
    text = text.replace("$", "").replace("\\%", "%").replace("\\!", "").replace("\\,", "")
    text = re.sub(r"\\(left|right)", "", text)
    text = re.sub(r"\^\{?\\circ\}?|°|degrees?", "", text)
    return re.sub(r"\s+", " ", text).strip().rstrip(".").strip().lower()


def to_number(text: str) -> float | None:
    text = normalize(text).replace(",", "")
    frac = re.fullmatch(r"\\[dt]?frac\{([^}]*)\}\{([^}]*)\}", text)
    if frac:
        num, den = to_number(frac.group(1)), to_number(frac.group(2))
        return num / den if num is not None and den not in (None, 0) else None
    text = re.sub(r"(cm|mm|m|km|units?|inches|in|ft|%)$", "", text).strip()
    if re.fullmatch(r"-?\d+(\.\d+)?/-?\d+(\.\d+)?", text):
        num, den = (float(x) for x in text.split("/"))
        return num / den if den else None
    sqrt = re.fullmatch(r"(-?\d+(?:\.\d+)?)?\s*\\?sqrt\{?(\d+(?:\.\d+)?)\}?", text)
    if sqrt:
        return float(sqrt.group(1) or 1) * math.sqrt(float(sqrt.group(2)))
    try:
        return float(text)
    except ValueError:
        return None


def match_choice(pred: str, choices: Sequence[str]) -> str | None:
    """The letter ``pred`` picks among ``choices``: by letter, or by the choice's text."""
    p = normalize(pred)
    m = re.fullmatch(r"\(?([a-j])\)?[.:]?", p)
    if m and LETTERS.lower().index(m.group(1)) < len(choices):
        return m.group(1).upper()
    for letter, choice in zip(LETTERS, choices):
        if p == normalize(str(choice)):
            return letter
    return None


def is_correct(response: str, answer: str, choices: Sequence[str] | None = None, rel_tol: float = 1e-2) -> bool:
    """Rule-based match of a response against the reference ``answer`` (see the module docstring)."""
    pred = extract_answer(response)
    if choices:
        picked = match_choice(pred, choices)
        gold = match_choice(answer, choices) or (answer.strip().upper() if answer.strip().upper() in LETTERS else None)
        return picked is not None and picked == gold
    a, b = to_number(pred), to_number(answer)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=rel_tol, abs_tol=1e-6)
    return normalize(pred) == normalize(answer) and normalize(pred) != ""


# ---------------------------------------------------------------------- data + generation
@dataclass
class Item:
    question: str
    answer: str
    image: Any
    choices: list[str] | None = None

    def prompt_text(self) -> str:
        text = self.question
        if self.choices:
            text += "\n" + "\n".join(f"{letter}. {c}" for letter, c in zip(LETTERS, self.choices))
        return text + " " + INSTRUCTION


def load_benchmark(path: str, limit: int | None = None) -> list[Item]:
    import io

    import pandas as pd
    from PIL import Image

    frame = pd.read_parquet(path)
    missing = {"question", "answer", "image"} - set(frame.columns)
    if missing:
        raise ValueError(f"{path}: missing columns {sorted(missing)}. Fix: provide question, answer, image (+choices)")
    items = []
    for record in frame.head(limit).to_dict("records") if limit else frame.to_dict("records"):
        image = record["image"]
        if isinstance(image, dict):
            image = image.get("bytes") or image.get("path")
        image = Image.open(io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else image).convert("RGB")
        choices = record.get("choices")
        choices = [str(c) for c in choices] if choices is not None and len(choices) else None
        items.append(Item(str(record["question"]), str(record["answer"]), image, choices))
    return items


def load_hf(model_path: str):
    """``(items, k, max_new_tokens) -> k responses per item`` with transformers' ``generate`` (greedy when k == 1);
    the model is loaded once."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForImageTextToText.from_pretrained(
        model_path, dtype=torch.bfloat16 if device == "cuda" else torch.float32
    ).to(device)
    model.eval()

    def generate(items: Sequence[Item], k: int, max_new_tokens: int) -> list[list[str]]:
        outputs = []
        for item in items:
            content = [{"type": "image"}, {"type": "text", "text": item.prompt_text()}]
            text = processor.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
            )
            enc = processor(text=[text], images=[item.image], return_tensors="pt").to(device)
            sampling = {"do_sample": False} if k == 1 else {"do_sample": True, "temperature": 1.0, "top_p": 1.0}
            with torch.no_grad():
                out = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    num_return_sequences=k,
                    pad_token_id=processor.tokenizer.pad_token_id,
                    **sampling,
                )
            start = enc["input_ids"].shape[1]
            outputs.append([processor.tokenizer.decode(o[start:], skip_special_tokens=True) for o in out])
        return outputs

    return generate


def load_vllm(model_path: str):
    """The same over vLLM (GPU). One engine serves every benchmark: a second ``LLM`` in the same process would not fit
    next to the first one's reserved GPU memory."""
    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams

    processor = AutoProcessor.from_pretrained(model_path)
    llm = LLM(model=model_path, limit_mm_per_prompt={"image": 1})

    def generate(items: Sequence[Item], k: int, max_new_tokens: int) -> list[list[str]]:
        params = SamplingParams(n=k, temperature=0.0 if k == 1 else 1.0, top_p=1.0, max_tokens=max_new_tokens)
        requests = []
        for item in items:
            content = [{"type": "image"}, {"type": "text", "text": item.prompt_text()}]
            prompt = processor.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
            )
            requests.append({"prompt": prompt, "multi_modal_data": {"image": item.image}})
        return [[o.text for o in result.outputs] for result in llm.generate(requests, params)]

    return generate


BACKENDS = {"hf": load_hf, "vllm": load_vllm}


def evaluate(
    model_path: str,
    data_dir: str,
    backend: str = "hf",
    k: int = 1,
    max_new_tokens: int = 2048,
    limit: int | None = None,
    benchmarks: Sequence[str] = BENCHMARKS,
) -> dict[str, dict[str, float]]:
    """Accuracy (avg@k, greedy when k == 1) per benchmark found in ``data_dir``; the model is loaded once."""
    paths = {name: os.path.join(data_dir, f"{name}.parquet") for name in benchmarks}
    paths = {name: path for name, path in paths.items() if os.path.isfile(path)}
    if not paths:
        raise ValueError(f"{data_dir}: none of {[b + '.parquet' for b in benchmarks]} found")
    generate = BACKENDS[backend](model_path)
    results: dict[str, dict[str, float]] = {}
    for name, path in paths.items():
        items = load_benchmark(path, limit)
        responses = generate(items, k, max_new_tokens)
        scores = [sum(is_correct(r, it.answer, it.choices) for r in rs) / len(rs) for it, rs in zip(items, responses)]
        results[name] = {"accuracy": 100.0 * sum(scores) / len(scores), "n": len(items), "k": k}
    return results


def summary_table(results: dict[str, dict[str, float]], label: str) -> str:
    names = [b for b in BENCHMARKS if b in results]
    head = "| model | " + " | ".join(names) + " |\n| --- |" + " --- |" * len(names)
    return head + f"\n| {label} | " + " | ".join(f"{results[b]['accuracy']:.1f}" for b in names) + " |"


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Score a Hugging Face checkpoint on the paper's benchmarks.")
    parser.add_argument("--model", required=True, help="HF checkpoint dir (merge FSDP checkpoints first)")
    parser.add_argument("--data-dir", required=True, help="folder with <benchmark>.parquet files")
    parser.add_argument("--backend", choices=tuple(BACKENDS), default="hf")
    parser.add_argument("--k", type=int, default=1, help="1 = greedy; K = avg@K with temperature 1.0")
    parser.add_argument("--max-new-tokens", type=int, default=2048)
    parser.add_argument("--limit", type=int, default=None, help="first N items per benchmark")
    parser.add_argument("--out", default=None, help="write the results JSON here")
    args = parser.parse_args(argv)
    results = evaluate(args.model, args.data_dir, args.backend, args.k, args.max_new_tokens, args.limit)
    label = os.path.basename(os.path.abspath(args.model)) + (" (greedy)" if args.k == 1 else f" (avg@{args.k})")
    print(summary_table(results, label))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
