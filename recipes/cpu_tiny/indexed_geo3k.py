"""verl's own Geometry3K reward, plus the problem's index in ``reward_extra_info`` (mini_repro.py's validation dumps).

verl 0.9.1's validation dump (``trainer/ppo/v1/trainer_base.py``, ``_validate`` -> ``_write_generations``) holds
``input``, ``output``, ``gts``, ``score``, ``step``, ``uid`` and the reward's extra infos, sorted by ``uid`` -- a
``uuid4`` drawn per prompt at each validation -- so its row order is not the dataset's, and neither ``input`` (the
same question for every figure, the image tokens decoded away) nor ``gts`` (an answer many problems share) says which
problem a row answers. A reward function that returns a dict puts its keys in the dump
(``reward_manager/naive.py``, ``dapo.py``), so this one returns verl's score unchanged with ``acc`` = that score
(what the naive and DAPO managers record for a float score, so ``val-core/.../acc`` and DAPO's ``filter_groups``
metric ``acc`` are what they are without it) and ``problem_index`` = the row's ``extra_info["index"]``
(``verl_tor.figures.task.to_verl_row``). Passed as ``reward.custom_reward_function.path=<this file>``.
"""

from __future__ import annotations

from typing import Any


def compute_score(
    data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None, **kwargs: Any
) -> dict | float:
    from verl.utils.reward_score import default_compute_score

    score = default_compute_score(data_source, solution_str, ground_truth, extra_info, **kwargs)
    if isinstance(score, dict):  # not Geometry3K's float: leave verl's result alone
        return score
    index = (extra_info or {}).get("index")
    if index is None:
        raise ValueError(
            "indexed_geo3k.compute_score: the row has no extra_info['index']; write the data with "
            "verl_tor.figures.write_figure_parquet."
        )
    return {"score": float(score), "acc": float(score), "problem_index": int(index)}
