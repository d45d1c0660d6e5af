"""Evaluation of a trained checkpoint on the paper's benchmarks: rule-based answer matching, no paid judge.

Protocol (stated once, used for every benchmark):

- **Prompt**: the benchmark's question (+ choices as ``A. ...`` lines) with the image, and the training instruction
  (reason in <think> </think>, final answer in \\boxed{}); chat template of the checkpoint's processor.
- **Decoding**: greedy (``--k 1``, temperature 0) or avg@k (``--k K``, temperature 1.0, top-p 1.0): the mean
  accuracy over K samples per question.
- **Extraction**: the content of the last ``\\boxed{...}`` or ``\\fbox{...}`` (balanced braces). No box, no answer:
  the response is wrong, as in training, whose reward (verl's Geometry3K scorer) grades ``\\boxed{}`` content only.
  ``boxed`` in the results is the share of responses that had one, so a format failure shows.
- **Multiple choice** (a ``choices`` column, or a reference that is a bare letter A-J): the response picks a letter
  by writing it (``B``, ``(B)``, ``B.``, ``B. 2``, ``B: 2``) or by writing a choice's content (compared as below);
  correct when it is the reference's letter (the reference may also be the choice's text).
- **Free-form answers**, equivalent when, after LaTeX normalisation (``$``, ``\\text{}``, ``\\left``/``\\right``,
  unicode ``√ π × ·`` and ``°`` written as LaTeX):
  1. both carry a unit and the units differ: **never** (``5 m`` ≠ ``5 cm``; a unit on one side only is ignored);
  2. both are plain decimal numbers (``12``, ``-0.5``, ``1,000``, ``50%``): **exactly equal** as decimals, no
     tolerance (``12.0`` = ``12``, but ``99.5`` ≠ ``100``, ``0.0000001`` ≠ ``0``, ``1,5`` ≠ ``15``). A relative
     tolerance would count near misses such as ``101`` for ``100`` as correct;
  3. otherwise, equal when training's scorer (mathruler's ``grade_answer``, which verl's Geometry3K reward uses)
     or math-verify (``verify``: symbolic equivalence with sympy, e.g. ``-\\frac{1}{2}`` = ``-0.5``, ``\\frac12`` =
     ``0.5``, ``x = 5`` = ``5``) says so;
  4. or one side is a decimal with d >= 1 places and the other an exact value (``3\\pi``, ``2\\sqrt{3}``, ``1/3``):
     equal when the exact value rounded half-up to d places is that decimal (``3\\pi`` = ``9.42``; a benchmark's
     decimal reference is a rounding of the exact answer);
  5. or both are text: equal ignoring case and spaces (``Yes`` = ``yes``).
- **Where evaluation and training differ**: training rewards ``grade_answer(\\boxed content, reference)`` alone.
  Evaluation accepts more: math-verify's equivalences, ``\\fbox``, unicode ``√``/``π``, exact values against rounded
  decimals, multiple-choice letters (Geometry3K's training answers have no choices). It accepts less in one place:
  mathruler treats a number within 1e-7 of an integer as that integer (``0.0000001`` = ``0``, ``5.00000001`` = ``5``);
  rule 2 does not. ``tests/test_evaluate_on_cpu.py`` checks both against verl's own Geometry3K scorer.
- **Data**: local parquet files, one per benchmark (``mathverse.parquet``, ``mathvision.parquet``,
  ``mathvista.parquet``, ``wemath.parquet``, ``hallusionbench.parquet``) with columns ``question``, ``answer``,
  ``image`` (``{"bytes": ...}`` or bytes or a path) and optional ``choices`` (a list of strings, or a string holding a
  JSON/Python list). A row without an answer or with an unreadable image fails its benchmark, naming the file and row;
  the other benchmarks still run, and the results file is rewritten after each one.

Backends: vLLM on GPU (imported lazily), and Hugging Face ``generate`` (runs on CPU with the tiny test model).
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

BENCHMARKS = ("mathverse", "mathvision", "mathvista", "wemath", "hallusionbench")
INSTRUCTION = (
    "You FIRST think about the reasoning process as an internal monologue and then provide the final answer. "
    "The reasoning process MUST BE enclosed within <think> </think> tags. The final answer MUST BE put in \\boxed{}."
)
LETTERS = "ABCDEFGHIJ"


class BenchmarkError(ValueError):
    """A benchmark file cannot be scored; the message names the file, the row and the fix."""


# ---------------------------------------------------------------------- answer matching
def extract_answer(text: str) -> str | None:
    """The content of the last balanced ``\\boxed{...}`` or ``\\fbox{...}`` of ``text``; None when there is none."""
    starts = [(m.end(), m.start()) for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    for begin, _ in reversed(starts):
        depth, j = 1, begin
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        if depth == 0:
            return text[begin : j - 1].strip()
    return None


_UNICODE = (
    ("−", "-"),
    ("–", "-"),
    ("×", "\\times "),
    ("·", "\\cdot "),
    ("÷", "\\div "),
    ("π", "\\pi "),
    ("°", "^\\circ"),
    ("²", "^2"),
    ("³", "^3"),
)


def normalize_latex(text: str) -> str:
    """Answer text -> plain LaTeX: math delimiters, ``\\text{}``-like wrappers, ``\\left``/``\\right``, spacing
    commands and a trailing period removed; unicode ``√ π × · − °`` written as LaTeX."""
    text = text.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if text.startswith(left) and text.endswith(right) and len(text) >= len(left) + len(right):
            text = text[len(left) : len(text) - len(right)].strip()
    text = text.replace("$", "")
    text = re.sub(r"\\(?:text|textbf|mathrm|mbox|operatorname)\s*\{([^{}]*)\}", r"\1", text)
    text = re.sub(r"\\(?:left|right)\b", "", text)
    text = re.sub(r"\\[,!;:]|\\quad|\\qquad|~", " ", text)
    text = re.sub(r"\\[dt]frac", r"\\frac", text)
    for char, latex in _UNICODE:
        text = text.replace(char, latex)
    text = re.sub(r"√\s*\(([^()]*)\)", r"\\sqrt{\1}", text)
    text = re.sub(r"√\s*\{([^{}]*)\}", r"\\sqrt{\1}", text)
    text = re.sub(r"√\s*([0-9.]+|[A-Za-z])", r"\\sqrt{\1}", text)
    text = re.sub(r"\s+", " ", text).strip()
    return text.rstrip(".").strip()


_UNITS = {
    "mm": "mm",
    "millimeter": "mm",
    "millimetre": "mm",
    "cm": "cm",
    "centimeter": "cm",
    "centimetre": "cm",
    "m": "m",
    "meter": "m",
    "metre": "m",
    "km": "km",
    "kilometer": "km",
    "kilometre": "km",
    "in": "in",
    "inch": "in",
    "inche": "in",
    "ft": "ft",
    "foot": "ft",
    "feet": "ft",
    "yd": "yd",
    "yard": "yd",
    "mi": "mi",
    "mile": "mi",
    "unit": "unit",
    "degree": "deg",
    "deg": "deg",
}
_UNIT_RE = re.compile(
    r"^(?P<value>.*?[0-9}])\s*(?P<square>square\s+|sq\.?\s+|cubic\s+)?"
    r"(?P<unit>" + "|".join(sorted(_UNITS, key=len, reverse=True)) + r")s?"
    r"(?P<power>\s*\^\s*\{?[23]\}?)?$"
    r"|^(?P<dvalue>.*?[0-9}])\s*\^\s*\{?\\circ\}?$",
)


def split_unit(text: str) -> tuple[str, str | None]:
    """``"5 cm^2"`` -> ``("5", "cm^2")``; ``"60^\\circ"`` -> ``("60", "deg")``; no unit -> ``(text, None)``."""
    m = _UNIT_RE.match(text)
    if m is None:
        return text, None
    if m.group("dvalue") is not None:
        return m.group("dvalue").strip(), "deg"
    unit = _UNITS[m.group("unit")]
    power = re.sub(r"\D", "", m.group("power") or "")
    if m.group("square"):
        power = "3" if m.group("square").startswith("cubic") else "2"
    return m.group("value").strip(), unit + (f"^{power}" if power else "")


_NUMBER_RE = re.compile(r"^[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?%?$")


def plain_number(text: str) -> Decimal | None:
    """A plain decimal number (``12``, ``-0.5``, ``.5``, ``1,000``, ``50%``) as a ``Decimal``; None otherwise.
    Commas only as thousands separators: ``1,5`` is not a number (it is a pair)."""
    text = text.replace("\\%", "%").replace(" ", "")
    if not text or not _NUMBER_RE.match(text) or not re.search(r"\d", text):
        return None
    try:
        return Decimal(text.rstrip("%").replace(",", ""))
    except InvalidOperation:
        return None


def _decimal_places(text: str) -> int:
    body = text.replace("\\%", "").rstrip("%")
    return len(body.split(".", 1)[1]) if "." in body else 0


def _timeout() -> int | None:
    """math-verify's timeouts use ``signal.alarm``, which only the main thread may set: none elsewhere."""
    import threading

    return 5 if threading.current_thread() is threading.main_thread() else None


def _math_verify_parse(text: str):
    from math_verify import parse

    return parse(f"${text}$", parsing_timeout=_timeout())


def _mathruler_equal(pred: str, gold: str) -> bool:
    from mathruler.grader import grade_answer

    try:
        return bool(grade_answer(pred, gold))
    except Exception:  # the PRM800K grader can raise on unusual input; that is "not shown equal"
        return False


def _math_verify_equal(pred: str, gold: str) -> bool:
    from math_verify import verify

    gold_parsed, pred_parsed = _math_verify_parse(gold), _math_verify_parse(pred)
    return (
        bool(gold_parsed) and bool(pred_parsed) and bool(verify(gold_parsed, pred_parsed, timeout_seconds=_timeout()))
    )


def _exact_value(text: str) -> Decimal | None:
    """The real value of an exact expression (``3\\pi``, ``2\\sqrt{3}``, ``1/3``) to 30 digits; None for anything
    else (decimals, symbols, sets)."""
    import sympy

    parsed = _math_verify_parse(text)
    expr = parsed[0] if parsed else None
    if not isinstance(expr, sympy.Expr) or expr.free_symbols or expr.atoms(sympy.Float):
        return None
    value = sympy.N(expr, 30)
    if not value.is_real or not value.is_finite:
        return None
    return Decimal(str(value))


def _rounds_to(exact_text: str, decimal_text: str) -> bool:
    places = _decimal_places(decimal_text)
    decimal = plain_number(decimal_text)
    if places == 0 or decimal is None or plain_number(exact_text) is not None:
        return False
    value = _exact_value(exact_text)
    if value is None:
        return False
    return value.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP) == decimal


def _is_text(text: str) -> bool:
    return bool(text) and re.fullmatch(r"[A-Za-z][A-Za-z '\-]*", text) is not None


def is_equivalent(pred: str, gold: str) -> bool:
    """Whether a free-form answer equals the reference (rules 1-5 of the module docstring)."""
    if pred is None or not pred.strip():
        return False
    p, g = normalize_latex(pred), normalize_latex(gold)
    p_value, p_unit = split_unit(p)
    g_value, g_unit = split_unit(g)
    if p_unit and g_unit and p_unit != g_unit:
        return False
    p_number, g_number = plain_number(p_value), plain_number(g_value)
    if p_number is not None and g_number is not None:
        return p_number == g_number
    if _mathruler_equal(pred, gold) or _math_verify_equal(p_value, g_value):
        return True
    if _rounds_to(p_value, g_value) or _rounds_to(g_value, p_value):
        return True
    return _is_text(p_value) and _is_text(g_value) and p_value.casefold().split() == g_value.casefold().split()


_LETTER_RE = re.compile(r"^\(?([A-J])\)?(?:$|[.:)]\s*(.*)$|\s+\((.*)\)$)", re.S)


def match_choice(answer: str, choices: Sequence[str]) -> str | None:
    """The letter ``answer`` picks among ``choices``: written as a letter (``B``, ``(B)``, ``B.``, ``B. 2``,
    ``B: 2``), or as the content of exactly one choice (compared with ``is_equivalent``)."""
    text = normalize_latex(answer)
    m = _LETTER_RE.match(text)
    if m and LETTERS.index(m.group(1)) < len(choices):
        return m.group(1)
    picked = [letter for letter, choice in zip(LETTERS, choices) if is_equivalent(text, str(choice))]
    return picked[0] if len(picked) == 1 else None


def is_correct(response: str, answer: str, choices: Sequence[str] | None = None) -> bool:
    """Rule-based match of a response against the reference ``answer`` (see the module docstring)."""
    pred = extract_answer(response)
    if pred is None:
        return False
    if choices:
        gold = match_choice(answer, choices)
        if gold is not None:
            return match_choice(pred, choices) == gold
    elif answer.strip().upper() in LETTERS and len(answer.strip()) == 1:  # a letter reference without its choices
        m = _LETTER_RE.match(normalize_latex(pred))
        return m is not None and m.group(1) == answer.strip().upper()
    return is_equivalent(pred, answer)


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


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def parse_choices(value: Any, where: str) -> list[str] | None:
    """A ``choices`` cell -> list of strings, or None (no choices): a list/array, or a string holding a JSON or
    Python list (parquet files written from CSV often store it so). A string that is not a list is refused rather
    than split into characters."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        if not value.strip():
            return None
        parsed = None
        for loads in (json.loads, ast.literal_eval):
            try:
                parsed = loads(value)
                break
            except (ValueError, SyntaxError):
                continue
        if not isinstance(parsed, (list, tuple)):
            raise BenchmarkError(
                f"{where}: choices {value[:80]!r} is a string, not a list. Fix: store a list of strings (or a "
                'string holding one, e.g. \'["3", "4"]\')'
            )
        value = parsed
    if not hasattr(value, "__len__") or isinstance(value, (bytes, dict)):
        raise BenchmarkError(f"{where}: choices of type {type(value).__name__}. Fix: store a list of strings")
    if len(value) > len(LETTERS):
        raise BenchmarkError(f"{where}: {len(value)} choices; at most {len(LETTERS)} (A-{LETTERS[-1]}) are lettered")
    return [str(c) for c in value] or None


def _open_image(value: Any, where: str):
    import io

    from PIL import Image

    try:
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (bytes, bytearray)):
            return Image.open(io.BytesIO(value)).convert("RGB")
        if isinstance(value, str):
            return Image.open(value).convert("RGB")
    except Exception as exc:  # PIL raises several types (UnidentifiedImageError, OSError, ...)
        raise BenchmarkError(
            f"{where}: the image cannot be opened ({exc}). Fix: store PNG/JPEG bytes or a path"
        ) from exc
    raise BenchmarkError(f"{where}: image of type {type(value).__name__}. Fix: store {{'bytes': ...}} or a path")


def load_benchmark(path: str, limit: int | None = None) -> list[Item]:
    """The rows of one benchmark parquet (the first ``limit``, when given) as ``Item`` s; ``BenchmarkError`` names
    the file and row of anything that cannot be scored."""
    import pandas as pd

    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise BenchmarkError(f"limit={limit!r}: give an integer >= 1 (or None for every row)")
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:
        raise BenchmarkError(f"{path}: cannot be read as parquet ({exc})") from exc
    missing = {"question", "answer", "image"} - set(frame.columns)
    if missing:
        raise BenchmarkError(
            f"{path}: missing columns {sorted(missing)}. Fix: provide question, answer, image (+choices)"
        )
    if limit is not None:
        frame = frame.head(limit)
    if frame.empty:
        raise BenchmarkError(f"{path}: no rows. Fix: fill the file or remove it from the data folder")
    items = []
    for i, record in enumerate(frame.to_dict("records")):
        where = f"{path} row {i}"
        if _is_missing(record["answer"]):
            raise BenchmarkError(f"{where}: no answer ({record['answer']!r}). Fix: give every row its answer")
        if _is_missing(record["question"]):
            raise BenchmarkError(f"{where}: no question. Fix: give every row its question")
        image = _open_image(record["image"], where)
        choices = parse_choices(record.get("choices"), where)
        items.append(Item(str(record["question"]), str(record["answer"]).strip(), image, choices))
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


def check_output_path(out: str) -> None:
    """Refuse an output path that cannot be written, before any model is loaded."""
    folder = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(out):
        raise BenchmarkError(f"--out {out!r} is a folder. Fix: give a file path, e.g. {out}/eval_results.json")
    if not os.path.isdir(folder):
        raise BenchmarkError(f"--out {out!r}: the folder {folder!r} does not exist. Fix: create it first")
    if not os.access(folder, os.W_OK):
        raise BenchmarkError(f"--out {out!r}: the folder {folder!r} is not writable")


def write_results(out: str, results: dict) -> None:
    """Write the results JSON atomically (a temp file, then ``os.replace``)."""
    tmp = f"{out}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    os.replace(tmp, out)


def evaluate(
    model_path: str,
    data_dir: str,
    backend: str = "hf",
    k: int = 1,
    max_new_tokens: int = 2048,
    limit: int | None = None,
    benchmarks: Sequence[str] = BENCHMARKS,
    out: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Accuracy (avg@k, greedy when k == 1) per benchmark found in ``data_dir``; the model is loaded once.

    Each benchmark is scored on its own: one that fails (a row without an answer, an unreadable image, no rows...)
    gets ``{"error": ...}`` naming the file and row, and the others still run. With ``out`` the results file is
    checked before the model loads and rewritten after every benchmark.
    """
    for name, value, low in (("k", k, 1), ("max_new_tokens", max_new_tokens, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise BenchmarkError(f"{name}={value!r}: give an integer >= {low}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise BenchmarkError(f"limit={limit!r}: give an integer >= 1 (or None for every row)")
    if backend not in BACKENDS:
        raise BenchmarkError(f"backend={backend!r}: choose one of {', '.join(BACKENDS)}")
    if out is not None:
        check_output_path(out)
    paths = {name: os.path.join(data_dir, f"{name}.parquet") for name in benchmarks}
    paths = {name: path for name, path in paths.items() if os.path.isfile(path)}
    if not paths:
        raise BenchmarkError(f"{data_dir}: none of {[b + '.parquet' for b in benchmarks]} found")
    generate = BACKENDS[backend](model_path)
    results: dict[str, dict[str, Any]] = {}
    for name, path in paths.items():
        try:
            items = load_benchmark(path, limit)
            responses = generate(items, k, max_new_tokens)
            if len(responses) != len(items) or any(len(rs) != k for rs in responses):
                raise BenchmarkError(f"{path}: the backend returned {len(responses)} rows for {len(items)} items")
            scores = [sum(is_correct(r, it.answer, it.choices) for r in rs) / k for it, rs in zip(items, responses)]
            boxed = sum(extract_answer(r) is not None for rs in responses for r in rs) / (k * len(items))
            results[name] = {"accuracy": 100.0 * sum(scores) / len(scores), "n": len(items), "k": k, "boxed": boxed}
        except Exception as exc:  # one benchmark's failure must not lose the others' results
            message = str(exc) if isinstance(exc, BenchmarkError) else f"{path}: {type(exc).__name__}: {exc}"
            results[name] = {"error": message}
            print(f"error: {name}: {message}", file=sys.stderr)
        if out is not None:
            write_results(out, results)
    return results


def summary_table(results: dict[str, dict[str, Any]], label: str) -> str:
    names = [b for b in BENCHMARKS if b in results]
    head = "| model | " + " | ".join(names) + " |\n| --- |" + " --- |" * len(names)
    cells = [f"{results[b]['accuracy']:.1f}" if "accuracy" in results[b] else "error" for b in names]
    return head + f"\n| {label} | " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    import argparse

    from verl_tor.tools.cli import int_at_least

    positive = int_at_least(1)
    parser = argparse.ArgumentParser(description="Score a Hugging Face checkpoint on the paper's benchmarks.")
    parser.add_argument("--model", required=True, help="HF checkpoint dir (merge FSDP checkpoints first)")
    parser.add_argument("--data-dir", required=True, help="folder with <benchmark>.parquet files")
    parser.add_argument("--backend", choices=tuple(BACKENDS), default="hf")
    parser.add_argument("--k", type=positive, default=1, help="1 = greedy; K = avg@K with temperature 1.0")
    parser.add_argument("--max-new-tokens", type=positive, default=2048)
    parser.add_argument("--limit", type=positive, default=None, help="first N items per benchmark")
    parser.add_argument("--out", default=None, help="write the results JSON here (after every benchmark)")
    args = parser.parse_args(argv)
    try:
        results = evaluate(
            args.model, args.data_dir, args.backend, args.k, args.max_new_tokens, args.limit, out=args.out
        )
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    label = os.path.basename(os.path.abspath(args.model)) + (" (greedy)" if args.k == 1 else f" (avg@{args.k})")
    print(summary_table(results, label))
    failed = sorted(name for name, r in results.items() if "error" in r)
    if failed:
        print(f"error: {len(failed)} benchmark(s) failed: {', '.join(failed)} (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
