"""A two-turn agent loop for the loop tests: the model answers, an "observation" (a tool's output) is appended to
the response with response_mask 0, and the model answers again -- the multi-turn layout of verl's tool agents,
whose masked observation tokens once broke the ToR stage's stored lengths (issue 11, item 1). A random model never
emits a real tool call, so the observation comes every time. Registered with verl through
``actor_rollout_ref.rollout.agent.agent_loop_config_path`` (``loop_agents.yaml``)."""

from __future__ import annotations

from typing import Any
from uuid import uuid4

from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopOutput

OBSERVATION = "\nobservation: 7\n"


class TwoTurnAgentLoop(AgentLoopBase):
    async def run(self, sampling_params: dict[str, Any], **kwargs: Any) -> AgentLoopOutput:
        budget = self.rollout_config.response_length
        messages = list(kwargs["raw_prompt"])
        multi_modal_data = await self.process_multi_modal_info(messages)
        images = multi_modal_data.get("images")
        prompt_ids = await self.ct_build_initial_tokens(messages, images=images, mm_inputs_out={})
        observation = self.tokenizer.encode(OBSERVATION, add_special_tokens=False)

        # the answer first (verl's Geometry3K scorer grades the text up to its \boxed{}), then a short second turn
        second_budget = 4
        first = await self.server_manager.generate(
            request_id=uuid4().hex,
            prompt_ids=prompt_ids,
            sampling_params={**sampling_params, "max_tokens": max(1, budget - len(observation) - second_budget)},
            image_data=images,
        )
        turn1 = list(first.token_ids)
        second = await self.server_manager.generate(
            request_id=uuid4().hex,
            prompt_ids=prompt_ids + turn1 + observation,
            sampling_params={**sampling_params, "max_tokens": second_budget},
            image_data=images,
        )
        response = turn1 + observation + list(second.token_ids)
        mask = [1] * len(turn1) + [0] * len(observation) + [1] * len(second.token_ids)
        logprobs = None
        if first.log_probs is not None and second.log_probs is not None:  # rollout.calculate_log_probs
            logprobs = list(first.log_probs) + [0.0] * len(observation) + list(second.log_probs)
        return AgentLoopOutput(
            prompt_ids=prompt_ids,
            response_ids=response[:budget],
            response_mask=mask[:budget],
            response_logprobs=logprobs[:budget] if logprobs is not None else None,
            multi_modal_data=multi_modal_data,
            num_turns=4,
            metrics={},
            extra_fields={**second.extra_fields, "turn_scores": [], "tool_rewards": []},
        )
