"""ToR on a model that reads its figure: where T_p and T_r land, against chance and against a random model.

The trained figure reader (``verl_tor.figures``, shipped checkpoint) and ``verl_tor.tiny``'s random Qwen2.5-VL (same
processor) answer held-out rectangle-area problems; every response token carries the task's ground truth (side
digits read from the figure, restated, computed, answer, operators, template). The real ToR path scores them
(``verl_tor.tools.demo.run_tor``: verl rows, old-policy pass, ``ToRStage`` with its image-free view, the selection ops;
paper defaults ρ_r = ρ_p = 0.3, batch scope) and the script prints:

1. grounding of T_p: the share of perception tokens that are figure-derived (read + restated side digits), the share
   expected by chance (figure-derived tokens among all valid ones), their ratio, and the share of read side digits
   that T_p catches (chance: ρ_p); for ``image_view`` remove and blank; own samples at T=1.0 and the reference
   responses teacher-forced;
2. negative controls (a broken image-free pass: image kept, log-probs shifted by one token, wrong temperature);
3. which kinds of token T_r and T_p hold, and the overlap |T_r ∩ T_p|;
4. full-vocabulary vs top-p (0.95) entropy: the share of T_r both rankings select.

    python benchmarks/bench_grounding.py                    # --problems 64 --n 4 --seed 0
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

from verl_tor.config import ToRConfig
from verl_tor.figures import (
    FIGURE_READER_CHECKPOINT,
    KINDS,
    load_figure_reader,
    make_problem,
    sample_responses,
    split_seeds,
)
from verl_tor.tools.grounding import measure_tor, reference_responses


def _fmt(x: float) -> str:
    return "n/a" if x != x else f"{x:.3f}"  # NaN -> n/a


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=FIGURE_READER_CHECKPOINT)
    parser.add_argument("--problems", type=int, default=64, help="held-out problems (val split)")
    parser.add_argument("--n", type=int, default=4, help="sampled responses per problem (T=1.0)")
    parser.add_argument("--seed", type=int, default=0, help="val split, sampling and random-model seed")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: as fast for a 1M model, robust to load)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    print(f"# bench_grounding: {sys.executable} benchmarks/bench_grounding.py {' '.join(sys.argv[1:])}")
    threads = torch.get_num_threads()
    print(f"# torch {torch.__version__}, {threads} threads, {os.cpu_count()} cores, python {platform.python_version()}")

    from verl_tor.tiny import build_tiny_qwen2_5_vl

    trained, processor = load_figure_reader(args.checkpoint)
    random_model = build_tiny_qwen2_5_vl(seed=args.seed, processor=processor)
    problems = [make_problem(s) for s in split_seeds("val", args.problems, args.seed)]
    reference = reference_responses(processor.tokenizer, problems)
    sampled = {
        "trained": sample_responses(trained, processor, problems, args.n, 1.0, args.seed),
        "random": sample_responses(random_model, processor, problems, args.n, 1.0, args.seed),
    }
    models = {"trained": trained, "random": random_model}
    base = ToRConfig(enable=True)
    runs = {}
    for name, model in models.items():
        for responses_name, responses in (("sampled T=1", sampled[name]), ("reference", reference)):
            for view in ("remove", "blank"):
                runs[name, responses_name, view] = measure_tor(
                    model,
                    processor,
                    problems,
                    responses,
                    base.replace(image_view=view),
                    with_top_p=view == "remove",
                )
    print(f"# {args.problems} held-out problems x {args.n} samples; rho_r = rho_p = 0.3, batch scope")
    print()
    print("Grounding of T_p (figure-derived = side digits read + restated):")
    print()
    print(
        "| model | responses | image_view | in format | tokens | figure-derived share (chance) | T_p precision | "
        "x chance | read digits in T_p | top-10% precision | mean S_t: read digits / template (nats) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (name, responses_name, view), m in runs.items():
        g, g10 = m.grounding(), m.grounding(m.top_fraction(0.1))
        read, template = m.sensitivity[m.mask_of("read")], m.sensitivity[m.mask_of("template")]
        s_read = f"{read.mean():.2f}" if read.numel() else "n/a"
        s_template = f"{template.mean():.3f}" if template.numel() else "n/a"
        print(
            f"| {name} | {responses_name} | {view} | {m.parsed.float().mean():.2f} | {int(m.response_mask.sum())} "
            f"| {_fmt(g['chance'])} | {_fmt(g['precision'])} | {_fmt(g['lift'])} | {_fmt(g['read_recall'])} "
            f"| {_fmt(g10['precision'])} | {s_read} / {s_template} |"
        )
    print()
    print("Negative controls (trained model, sampled T=1, image_view=remove, a broken image-free pass):")
    print()
    print("| image-free pass | T_p precision | x chance | read digits in T_p | median S_t of template tokens (nats) |")
    print("| --- | --- | --- | --- | --- |")
    controls = [("real", None, 1.0), ("image kept", "image_kept", 1.0), ("shifted by one token", "shifted", 1.0)]
    controls += [(f"scored at T={t:g} (old pass: T=1)", "wrong_temperature", t) for t in (0.5, 0.8, 2.0)]
    for label, control, temperature in controls:
        c = measure_tor(trained, processor, problems, sampled["trained"], base, control, temperature)
        g = c.grounding()
        zero_point = float(c.sensitivity[c.mask_of("template")].median())
        print(f"| {label} | {_fmt(g['precision'])} | {_fmt(g['lift'])} | {_fmt(g['read_recall'])} | {zero_point:.4f} |")
    print()
    print("Where T_r and T_p fall (image_view=remove): share of each token kind")
    print()
    print(
        "| model | responses | kind | of all tokens | of T_r | of T_p | kind's tokens in T_r | kind's tokens in T_p |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for (name, responses_name, view), m in runs.items():
        if view != "remove" or (name == "random" and responses_name != "reference"):
            continue
        for kind in KINDS:
            mask = m.mask_of(kind)
            if not bool(mask.any()):
                continue
            print(
                f"| {name} | {responses_name} | {kind} | {m.share(mask):.3f} | {m.share(mask, m.reasoning):.3f} "
                f"| {m.share(mask, m.perception):.3f} | {m.share(m.reasoning, mask):.3f} "
                f"| {m.share(m.perception, mask):.3f} |"
            )
    print()
    print("Overlap and entropy (image_view=remove; random sets would give 0.090 of N and 0.300 of T_r):")
    print()
    print(
        "| model | responses | abs(T_r ∩ T_p) / N | abs(T_r ∩ T_p) / abs(T_r) | T_r agreement, full vs top-p entropy "
        "| tokens with top-p entropy ≈ 0 | of those > 0: in full-entropy T_r |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for (name, responses_name, view), m in runs.items():
        if view != "remove":
            continue
        both = m.reasoning & m.perception
        agree = m.share(m.reasoning_top_p, m.reasoning)
        # ≈ 0: at most 1e-6 nats (a one-token nucleus is exactly 0 in verl_tor.ops; tiny multi-token nuclei count too)
        nonzero = m.entropy_top_p > 1e-6
        print(
            f"| {name} | {responses_name} | {m.share(both):.3f} | {m.share(both, m.reasoning):.3f} | {agree:.3f} "
            f"| {m.share(~nonzero):.3f} | {m.share(m.reasoning, nonzero):.3f} |"
        )
    print()
    print(f"# {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
