"""A toy outcome reward for the loop tests' random tiny model, which never solves a geometry problem: a deterministic
function of the response text that varies across sampled responses, so GRPO's advantages are non-zero and the policy
loss is not 0. Loaded by verl's reward workers through ``reward.custom_reward_function.path``."""


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    return (sum(map(ord, solution_str)) % 7) / 6.0
