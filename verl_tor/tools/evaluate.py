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
  unicode ``√ π × ·`` and ``°`` written as LaTeX), the unit and the equation's left side are taken off:

  - *unit*: the word(s) after a number (or after ``}``, or after ``\\pi`` and a space): a unit of the built-in table
    (length, area/volume via ``^2``/``^3``/``square``/``cubic``, mass, time, volume, speed, angle, money; plurals and
    full names fold to one symbol: ``3 hours`` = ``3 h``, ``km per hour`` = ``km/h``), or any other word of two
    letters or more set off by a space, compared as written up to case and plural (``5 coins`` = ``5 coin``). A
    single letter outside the table is a variable, not a unit (``2x``). ``60^\\circ`` is ``60 deg``;
  - *equation*: ``lhs = rhs`` with one ``=`` and no comma. When both sides of the comparison are equations, their
    left sides must be the same (``x = 5`` ≠ ``y = 5``) and the right sides are compared; differing left sides are
    equal only as the same equation rearranged (math-verify: ``x + y = 5`` = ``y + x = 5``). An equation against a
    plain value compares its right side (``x = 5`` = ``5``, ``AB = 5`` = ``5``);

  1. both carry a unit and the units differ: **never** (``5 m`` ≠ ``5 cm``, ``5 kg`` ≠ ``5 g``, ``5 m`` ≠ ``5 min``,
     ``5 meals`` ≠ ``5 coins``; a unit on one side only is ignored: ``5 cm`` = ``5``). The matchers below get the
     values without their units, and math-verify's own unit stripping (which drops ``kg``, ``g``, ``s``, ``h``,
     ``meal``... silently) is switched off;
  2. both values are plain decimal numbers (``12``, ``-0.5``, ``1,000``, ``50%``): **exactly equal** as decimals, no
     tolerance (``12.0`` = ``12``, but ``99.5`` ≠ ``100``, ``0.0000001`` ≠ ``0``, ``1,5`` ≠ ``15``). A relative
     tolerance would count near misses such as ``101`` for ``100`` as correct;
  3. otherwise, equal when training's scorer (mathruler's ``grade_answer``, which verl's Geometry3K reward uses)
     or math-verify (``verify``: symbolic equivalence with sympy, e.g. ``-\\frac{1}{2}`` = ``-0.5``, ``\\frac12`` =
     ``0.5``) says so;
  4. or one side is a decimal with d >= 1 places and the other an exact value (``3\\pi``, ``2\\sqrt{3}``, ``1/3``):
     equal when the exact value rounded half-up to d places is that decimal (``3\\pi`` = ``9.42``; a benchmark's
     decimal reference is a rounding of the exact answer);
  5. or both are text: equal ignoring case and spaces (``Yes`` = ``yes``).

  A missing answer or reference (None or blank) equals nothing. Time: math-verify stops each parse and comparison
  after ``EQUIVALENCE_TIMEOUT_S`` (5 s) with "not equal"; its timeout is ``signal.alarm``, which works on a main
  thread only, so a call from any other thread runs in a worker process (``EquivalenceWorker``) that is killed after
  ``WORKER_LIMIT_S``. math-verify's log lines are cut to ``LOG_CHARS`` characters (it logs its whole input on a
  timeout).
- **Where evaluation and training differ**: training rewards ``grade_answer(\\boxed content, reference)`` alone.
  Evaluation accepts more: math-verify's equivalences, ``\\fbox``, unicode ``√``/``π``, exact values against rounded
  decimals, multiple-choice letters (Geometry3K's training answers have no choices). It accepts less in three places:
  mathruler treats a number within 1e-7 of an integer as that integer (``0.0000001`` = ``0``, ``5.00000001`` = ``5``),
  rule 2 does not; mathruler drops the units it knows (``3 hours`` = ``3 minutes``), rule 1 does not; mathruler drops
  a short left side (``x=5`` = ``y=5``), the equation rule does not. ``tests/test_evaluate_on_cpu.py`` checks all of
  these against verl's own Geometry3K scorer.
- **Data**: local parquet files, one per benchmark (``mathverse.parquet``, ``mathvision.parquet``,
  ``mathvista.parquet``, ``wemath.parquet``, ``hallusionbench.parquet``) with columns ``question``, ``answer``,
  ``image`` (``{"bytes": ...}`` or bytes or a path) and optional ``choices`` (a list of strings, or a string holding a
  JSON/Python list). A row without an answer or with an unreadable image fails its benchmark, naming the file and row;
  the other benchmarks still run, and the results file is rewritten after each one.

Backends: vLLM on GPU (imported lazily), and Hugging Face ``generate`` (runs on CPU with the tiny test model).
"""

from __future__ import annotations

import ast
import atexit
import json
import logging
import math
import os
import re
import select
import subprocess
import sys
import threading
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
logger = logging.getLogger(__name__)


class BenchmarkError(ValueError):
    """A benchmark file cannot be scored; the message names the file, the row and the fix."""


# ---------------------------------------------------------------------- answer matching
_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE_RE = re.compile(r"[{}]")


def extract_answer(text: str) -> str | None:
    """The content of the last balanced ``\\boxed{...}`` or ``\\fbox{...}`` of ``text``; None when there is none.

    "Last" is the closed box that opens last (so ``\\boxed{\\boxed{3}}`` gives ``3``). One pass with a stack of open
    braces: linear in ``len(text)`` (closing each box by its own scan was quadratic on unclosed ``\\boxed{`` runs).
    """
    box_braces = {m.end() - 1 for m in _BOX_RE.finditer(text)}
    stack: list[int] = []  # positions of the open "{"
    best = -1  # the opening brace of the last-opening closed box so far, and its content
    content = None
    for brace in _BRACE_RE.finditer(text):
        j = brace.start()
        if brace.group() == "{":
            stack.append(j)
        elif stack:
            begin = stack.pop()
            if begin in box_braces and begin > best:
                best, content = begin, text[begin + 1 : j]
    return None if content is None else content.strip()


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
    """Answer text -> plain LaTeX: math delimiters and ``\\$``, ``\\text{}``-like wrappers, ``\\left``/``\\right``,
    spacing commands and a trailing period removed; unicode ``√ π × · − °`` written as LaTeX."""
    text = text.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if text.startswith(left) and text.endswith(right) and len(text) >= len(left) + len(right):
            text = text[len(left) : len(text) - len(right)].strip()
    text = text.replace("\\$", "").replace("$", "")  # math delimiters and the escaped dollar sign of an amount
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


# Canonical unit symbol for each spelling (the singular; plurals are found by removing "s"/"es"). It covers every
# unit mathruler strips on its own (degree, cm, meter, mile, second, minute, hour, day, week, month, year, foot,
# inch, yard), so a unit it would drop is always seen here first.
_UNITS = {
    **dict.fromkeys(("mm", "millimeter", "millimetre"), "mm"),
    **dict.fromkeys(("cm", "centimeter", "centimetre"), "cm"),
    **dict.fromkeys(("dm", "decimeter", "decimetre"), "dm"),
    **dict.fromkeys(("m", "meter", "metre"), "m"),
    **dict.fromkeys(("km", "kilometer", "kilometre"), "km"),
    **dict.fromkeys(("in", "inch", "inche"), "in"),
    **dict.fromkeys(("ft", "foot", "feet"), "ft"),
    **dict.fromkeys(("yd", "yard"), "yd"),
    **dict.fromkeys(("mi", "mile"), "mi"),
    **dict.fromkeys(("mg", "milligram"), "mg"),
    **dict.fromkeys(("g", "gram", "gm"), "g"),
    **dict.fromkeys(("kg", "kilogram"), "kg"),
    **dict.fromkeys(("tonne", "ton"), "t"),
    **dict.fromkeys(("lb", "lbs", "pound"), "lb"),
    **dict.fromkeys(("oz", "ounce"), "oz"),
    **dict.fromkeys(("ms", "millisecond"), "ms"),
    **dict.fromkeys(("s", "sec", "second"), "s"),
    **dict.fromkeys(("min", "minute"), "min"),
    **dict.fromkeys(("h", "hr", "hour"), "h"),
    **dict.fromkeys(("day",), "day"),
    **dict.fromkeys(("week", "wk"), "week"),
    **dict.fromkeys(("month",), "month"),
    **dict.fromkeys(("year", "yr"), "year"),
    **dict.fromkeys(("ml", "mL", "milliliter", "millilitre"), "mL"),
    **dict.fromkeys(("l", "L", "liter", "litre"), "L"),
    **dict.fromkeys(("gal", "gallon"), "gal"),
    **dict.fromkeys(("acre",), "acre"),
    **dict.fromkeys(("ha", "hectare"), "ha"),
    **dict.fromkeys(("mph",), "mi/h"),
    **dict.fromkeys(("kmh", "kph"), "km/h"),
    **dict.fromkeys(("degree", "deg"), "deg"),
    **dict.fromkeys(("rad", "radian"), "rad"),
    **dict.fromkeys(("dollar",), "dollar"),
    **dict.fromkeys(("cent",), "cent"),
    **dict.fromkeys(("unit",), "unit"),
}
# Words that follow a number in an answer without being its unit (constants, connectives, functions).
_NOT_UNITS = frozenset(
    "pi and or to of is per sqrt times cdot inf infty infinity sin cos tan log ln exp mod pmod circ dots ldots "
    "approx".split()
)
_POWER = r"(?:\s*\^\s*\{?\s*[23]\s*\}?)?"
_UNIT_TAIL_RE = re.compile(
    r"(?P<sep>\s*)(?<![A-Za-z\\])(?P<unit>(?:(?:square|sq\.?|cubic)\s+)?[A-Za-z]+"
    + _POWER
    + r"(?:\s*(?:/|\bper\b)\s*[A-Za-z]+"
    + _POWER
    + r")?)$"
)
_DEGREE_RE = re.compile(r"(?<=[0-9}])\s*\^\s*\{?\\circ\}?$")
_UNIT_WINDOW = 80  # a unit is at most this many characters: only the end of a (possibly huge) answer is searched


def _singular(word: str) -> str:
    if word.endswith("es") and word[:-2].endswith(("s", "x", "z", "ch", "sh")) and len(word) > 4:
        return word[:-2]
    return word[:-1] if word.endswith("s") and not word.endswith("ss") and len(word) > 2 else word


def _unit_word(word: str, spaced: bool) -> str | None:
    """The canonical symbol of one unit word, or None when ``word`` is not a unit. A word outside the table counts
    as a unit (compared as written, case and plural aside) when it has two letters or more and is set off by a
    space: ``5 coins``, but not ``2x`` or ``5 x`` (variables)."""
    for form in (word, word.lower(), _singular(word), _singular(word.lower())):
        if form in _UNITS and (len(form) > 1 or form == word):
            return _UNITS[form]
    if spaced and len(word) >= 2 and word.lower() not in _NOT_UNITS:
        return _singular(word.lower())
    return None


def split_unit(text: str) -> tuple[str, str | None]:
    """``"5 cm^2"`` -> ``("5", "cm^2")``; ``"60^\\circ"`` -> ``("60", "deg")``; ``"3 km per hour"`` -> ``("3",
    "km/h")``; ``"5 coins"`` -> ``("5", "coin")``; no unit -> ``(text, None)``. The value before a unit must end in
    a digit, a ``}`` or (set off by a space) a LaTeX command such as ``\\pi``."""
    start = max(0, len(text) - _UNIT_WINDOW)
    degree = _DEGREE_RE.search(text, start)
    if degree is not None:
        return text[: degree.start()].strip(), "deg"
    m = _UNIT_TAIL_RE.search(text, start)
    if m is None:
        return text, None
    value, spaced = text[: m.start()].rstrip(), bool(m.group("sep"))
    if not (re.search(r"[0-9}]$", value) or (spaced and re.search(r"\\[A-Za-z]+$", value))):
        return text, None
    unit = m.group("unit")
    power = "3" if unit.startswith("cubic") else "2" if re.match(r"(?:square|sq)\b", unit) else ""
    unit = re.sub(r"^(?:square|sq\.?|cubic)\s+", "", unit)
    parts = []
    for part in re.split(r"\s*(?:/|\bper\b)\s*", unit):
        word = re.match(r"[A-Za-z]+", part).group()
        symbol = _unit_word(word, spaced or bool(parts))
        if symbol is None:
            return text, None
        exponent = re.sub(r"\D", "", part[len(word) :]) or (power if not parts else "")
        parts.append(symbol + (f"^{exponent}" if exponent else ""))
    return value, "/".join(parts)


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


_EQUALS_RE = re.compile(r"(?<![<>!=\\])=(?!=)")


def split_equation(text: str) -> tuple[str, str] | None:
    """``"x = 5"`` -> ``("x", "5")``: exactly one ``=`` (not ``<=``, ``>=``, ``!=``, ``==``), both sides non-empty,
    no comma (a list such as ``x=1, y=2`` stays whole); None otherwise."""
    if "," in text:
        return None
    parts = _EQUALS_RE.split(text)
    if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
        return None
    return parts[0].strip(), parts[1].strip()


# ---------------------------------------------------------------------- the matchers, bounded in time
EQUIVALENCE_TIMEOUT_S = 5
"""math-verify's limit (whole seconds, its default) for each parse and each comparison. It is ``signal.alarm``, which
only a main thread may set: off the main thread, ``is_equivalent`` runs in ``EquivalenceWorker`` (whose main thread
applies it)."""
WORKER_LIMIT_S = 60
"""The most one ``is_equivalent`` call may take in the worker process before the worker is killed and the answer
counted as not equal. Each math-verify step stops at ``EQUIVALENCE_TIMEOUT_S``; this catches the rest (sympy work
outside math-verify, code that a signal cannot interrupt)."""
LOG_CHARS = 200
"""math-verify logs its whole input when a parse times out (a 1 MB line for a 1 MB answer); longer log messages of
its loggers are cut to this many characters."""
_MATH_VERIFY_LOGGERS = ("math_verify.parser", "math_verify.grader", "math_verify.utils", "math_verify.metric")


class _ClipLongMessages(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if len(message) > LOG_CHARS:
            record.msg, record.args = f"{message[:LOG_CHARS]}... [{len(message)} characters]", ()
        return True


def _math_verify():
    """The ``math_verify`` module, its loggers capped at ``LOG_CHARS``."""
    import math_verify

    for name in _MATH_VERIFY_LOGGERS:
        log = logging.getLogger(name)
        if not any(isinstance(f, _ClipLongMessages) for f in log.filters):
            log.addFilter(_ClipLongMessages())
    return math_verify


def _timeout() -> int | None:
    """``EQUIVALENCE_TIMEOUT_S`` on the main thread; None elsewhere, where ``signal.alarm`` would raise
    (``is_equivalent`` never runs these helpers off a main thread: it hands such calls to the worker process)."""
    return EQUIVALENCE_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _math_verify_parse(text: str):
    """math-verify's parse with its unit stripping off: ``split_unit`` has taken the unit already, and a word it
    does not know must stay in the value rather than be dropped (``5 meals`` is not ``5 coins``)."""
    from latex2sympy2_extended import NormalizationConfig

    mv = _math_verify()
    normalization = NormalizationConfig(
        basic_latex=True, units=False, malformed_operators=True, nits=True, boxed="all", equations=False
    )
    extraction = [mv.LatexExtractionConfig(normalization_config=normalization), mv.ExprExtractionConfig()]
    return mv.parse(f"${text}$", extraction_config=extraction, parsing_timeout=_timeout())


def _mathruler_equal(pred: str, gold: str) -> bool:
    from mathruler.grader import grade_answer

    try:
        return bool(grade_answer(pred, gold))
    except Exception:  # the PRM800K grader can raise on unusual input; that is "not shown equal"
        return False


def _math_verify_equal(pred: str, gold: str) -> bool:
    mv = _math_verify()
    gold_parsed, pred_parsed = _math_verify_parse(gold), _math_verify_parse(pred)
    return (
        bool(gold_parsed)
        and bool(pred_parsed)
        and bool(mv.verify(gold_parsed, pred_parsed, timeout_seconds=_timeout()))
    )


def _exact_value(text: str) -> Decimal | None:
    """The real value of an exact expression (``3\\pi``, ``2\\sqrt{3}``, ``1/3``) to 30 digits; None for anything
    else (decimals, symbols, sets) and when sympy overruns ``EQUIVALENCE_TIMEOUT_S``."""
    import sympy
    from math_verify.errors import TimeoutException
    from math_verify.utils import timeout

    parsed = _math_verify_parse(text)
    expr = parsed[0] if parsed else None
    if not isinstance(expr, sympy.Expr) or expr.free_symbols or expr.atoms(sympy.Float):
        return None
    try:
        value = timeout(timeout_seconds=_timeout())(sympy.N)(expr, 30)
    except TimeoutException:
        return None
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


def _equal_values(p: str, g: str) -> bool:
    """Rules 2-5 of the module docstring on two values without units or equation sides."""
    p_number, g_number = plain_number(p), plain_number(g)
    if p_number is not None and g_number is not None:
        return p_number == g_number
    if _mathruler_equal(p, g) or _math_verify_equal(p, g):
        return True
    if _rounds_to(p, g) or _rounds_to(g, p):
        return True
    return _is_text(p) and _is_text(g) and p.casefold().split() == g.casefold().split()


def _is_equivalent(pred: str, gold: str) -> bool:
    """``is_equivalent`` on this thread (math-verify's timeouts need it to be a main thread)."""
    p_value, p_unit = split_unit(normalize_latex(pred))
    g_value, g_unit = split_unit(normalize_latex(gold))
    if p_unit and g_unit and p_unit != g_unit:
        return False
    p_eq, g_eq = split_equation(p_value), split_equation(g_value)
    if p_eq and g_eq:
        if re.sub(r"\s+", "", p_eq[0]) == re.sub(r"\s+", "", g_eq[0]):
            return _equal_values(p_eq[1], g_eq[1])
        return _math_verify_equal(p_value, g_value)  # the same equation rearranged (x + y = 5, y + x = 5) only
    return _equal_values(p_eq[1] if p_eq else p_value, g_eq[1] if g_eq else g_value)


def serve_equivalence() -> None:
    """The worker process's loop: one JSON request ``[pred, gold, timeout_s]`` per line on stdin, one JSON
    ``true``/``false`` per line on stdout, on this process's main thread."""
    global EQUIVALENCE_TIMEOUT_S
    replies = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)  # whatever a library prints goes to stderr, not into the replies
    # import sympy, math-verify and mathruler now, so that the first request's time limit is not spent on imports
    _exact_value("1/3")
    _mathruler_equal("1", "1")
    replies.write("ready\n")
    for line in sys.stdin:
        pred, gold, EQUIVALENCE_TIMEOUT_S = json.loads(line)
        replies.write(json.dumps(_is_equivalent(pred, gold)) + "\n")


class EquivalenceWorker:
    """A child process that answers ``is_equivalent`` for callers off the main thread (math-verify's timeouts only
    work on a main thread; without one, ``10^{10^{10}}`` froze the whole process). One request at a time; a request
    that overruns ``WORKER_LIMIT_S`` kills the child and counts as not equal, and the next request starts a new one.
    """

    STARTUP_LIMIT_S = 300
    """Time for the child to import sympy and math-verify (seconds under load on a small machine)."""

    def __init__(self, command: Sequence[str] | None = None):
        self.command = list(
            command or [sys.executable, "-c", "import verl_tor.tools.evaluate as e; e.serve_equivalence()"]
        )
        self.process: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def _read_line(self, limit_s: float) -> str | None:
        """The child's next line, or None when it sent none within ``limit_s`` or has exited."""
        ready, _, _ = select.select([self.process.stdout], [], [], limit_s)
        line = self.process.stdout.readline() if ready else ""
        return line.strip() or None

    def _start(self) -> None:
        import verl_tor

        # the child imports this very verl_tor, even when the caller found it through a sys.path of its own
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(verl_tor.__file__)))
        path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
        self.process = subprocess.Popen(
            self.command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": path},
        )
        if self._read_line(self.STARTUP_LIMIT_S) != "ready":
            self.close()
            raise RuntimeError(f"the answer-matching worker ({' '.join(self.command)}) did not start")

    def compare(self, pred: str, gold: str) -> bool:
        with self._lock:
            if self.process is None or self.process.poll() is not None:
                self._start()
            try:
                self.process.stdin.write(json.dumps([pred, gold, EQUIVALENCE_TIMEOUT_S]) + "\n")
                self.process.stdin.flush()
                reply = self._read_line(WORKER_LIMIT_S)
            except BrokenPipeError:  # the child died between the check above and this request
                reply = None
            if reply is None:
                self.close()
                logger.warning(
                    "answer matching took over %s s (or its worker process stopped): counted as not equal "
                    "(answer %.80r, reference %.80r)",
                    WORKER_LIMIT_S,
                    pred,
                    gold,
                )
                return False
            return bool(json.loads(reply))

    def close(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            for stream in (self.process.stdin, self.process.stdout):
                stream.close()
            self.process = None


_WORKER = EquivalenceWorker()
atexit.register(lambda: _WORKER.close())


def is_equivalent(pred: str | None, gold: str | None) -> bool:
    """Whether a free-form answer equals the reference (rules 1-5 of the module docstring). A missing answer or a
    missing reference (None, or blank) is never equal to anything. On the main thread it runs here, under
    math-verify's timeouts; on any other thread, in ``EquivalenceWorker`` (bounded by ``WORKER_LIMIT_S``)."""
    if pred is None or gold is None or not str(pred).strip() or not str(gold).strip():
        return False
    if threading.current_thread() is threading.main_thread():
        return _is_equivalent(str(pred), str(gold))
    return _WORKER.compare(str(pred), str(gold))


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


def is_correct(response: str, answer: str | None, choices: Sequence[str] | None = None) -> bool:
    """Rule-based match of a response against the reference ``answer`` (see the module docstring). No reference
    (None or blank) is never matched, as in ``is_equivalent``."""
    pred = extract_answer(response)
    if pred is None or answer is None or not str(answer).strip():
        return False
    answer = str(answer)
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


def check_model(model_path: str) -> None:
    """Refuse a checkpoint the backends could not load, before anything is loaded: ``verl-tor inspect``'s check
    (``config.json`` of a family verl_tor supports), then weight files next to it."""
    from verl_tor import SUPPORTED_MODEL_TYPES
    from verl_tor.tools.inspection import InspectError, check_checkpoint

    try:
        check_checkpoint(model_path, SUPPORTED_MODEL_TYPES)
    except InspectError as exc:
        raise BenchmarkError(str(exc)) from None
    if not any(name.endswith((".safetensors", ".bin", ".index.json")) for name in os.listdir(model_path)):
        raise BenchmarkError(
            f"--model {model_path!r}: config.json but no weights (*.safetensors or *.bin) there. Fix: pass the "
            "folder the checkpoint was saved or merged into (python -m verl.model_merger merge ...)"
        )


def check_output_path(out: str) -> None:
    """Refuse an output path that cannot be written, before any model is loaded, by creating (then removing) the
    temporary file ``write_results`` writes first: permission bits alone do not tell (root may write anywhere
    ``os.access`` is asked about, yet not into ``/proc``). An existing results file is left as it is."""
    folder = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(out):
        raise BenchmarkError(f"--out {out!r} is a folder. Fix: give a file path, e.g. {out}/eval_results.json")
    if not os.path.isdir(folder):
        raise BenchmarkError(f"--out {out!r}: the folder {folder!r} does not exist. Fix: create it first")
    probe = _temporary_path(out)
    try:
        with open(probe, "x", encoding="utf-8"):
            pass
        os.remove(probe)
    except OSError as exc:
        raise BenchmarkError(
            f"--out {out!r} cannot be written: creating {probe!r} failed ({exc.strerror}). Fix: choose a file in a "
            "writable folder"
        ) from None


def _temporary_path(out: str) -> str:
    return f"{out}.tmp{os.getpid()}"


def write_results(out: str, results: dict) -> None:
    """Write the results JSON atomically (a temp file, then ``os.replace``)."""
    tmp = _temporary_path(out)
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
    checked before the model loads and rewritten after every benchmark; the checkpoint is checked before too.
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
    check_model(model_path)
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
    parser.add_argument(
        "--model", required=True, help="HF checkpoint dir of Qwen2-VL/2.5-VL/3-VL (merge FSDP checkpoints first)"
    )
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
