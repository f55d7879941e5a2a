"""Generation engines and the per-token log-prob forward pass.

Both engines return the sampler's own log-prob of each sampled token (`Generation.rollout_logp`),
so the trainer can report how far the sampler's numbers are from its own (`mismatch/*`),
separately from the policy-update ratio. `TransformersRollout` samples with `model.generate` and
records the log-softmax of the very scores it samples from (after temperature, top-k and top-p),
optionally on a copy of the policy in another dtype (`--rollout-dtype`) refreshed only every K
rollouts (`--rollout-sync-every`): the bf16 and stale samplers of real runs, on a CPU.
`VLLMRollout` samples with vLLM and returns its sampled-token log-probs; it reloads the
trainer's weights at each sync.

Sequences are laid out as [left-padded prompt | completion right-padded]; the completion
mask covers tokens up to and including the first end-of-sequence token. A completion without
one was cut at the length limit (`Generation.truncated`).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


@dataclass
class Generation:
    """One rollout's sequences. Shapes: N = prompts * G, P = prompt width, T = completion width."""

    input_ids: Tensor  # (N, P + T)
    attention_mask: Tensor  # (N, P + T)
    prompt_width: int  # P
    completion_mask: Tensor  # (N, T) bool
    rollout_logp: Tensor | None  # (N, T) float32: the sampler's log-probs of the sampled tokens, if it reports them
    truncated: Tensor  # (N,) bool: cut at the length limit, no end-of-sequence token among the completion's tokens


class Rollout(Protocol):
    def generate(self, model: Any, prompt_ids: list[list[int]], group_size: int, sync: bool = True) -> Generation:
        """Sample G completions per prompt; `sync`: refresh the sampler's weights from `model` first."""
        ...


def completion_mask(completion: Tensor, eos_ids: list[int]) -> Tensor:
    """(N, T) bool: tokens up to and including the first end-of-sequence token (any of `eos_ids`)."""
    is_eos = torch.isin(completion, torch.tensor(eos_ids, device=completion.device))
    after = (is_eos.cumsum(-1) - is_eos.long()) > 0  # strictly after the first eos
    return ~after


def truncated(completion: Tensor, mask: Tensor, eos_ids: list[int]) -> Tensor:
    """(N,) bool: the completions with no end-of-sequence token among their valid (`mask`) tokens."""
    is_eos = torch.isin(completion, torch.tensor(eos_ids, device=completion.device))
    return ~(is_eos & mask).any(dim=-1)


def left_pad(prompt_ids: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    width = max(map(len, prompt_ids))
    ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions counted from each row's first real token (what `generate` uses for left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def token_logp(
    model: Any,
    input_ids: Tensor,
    attention_mask: Tensor,
    prompt_width: int,
    with_entropy: bool = False,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor | None]:
    """Log-prob of each completion token under `model` at the sampling `temperature` (N, T), float32; and
    the token entropy (N, T). As TRL and verl do, the logits are divided by the temperature, so the
    ratios refer to the distribution the completions were sampled from."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask)).logits
    logits = logits[:, prompt_width - 1 : -1].float()  # (N, T, V): position t predicts token t+1
    if temperature != 1.0:
        logits = logits / temperature
    targets = input_ids[:, prompt_width:]
    logsm = torch.log_softmax(logits, dim=-1)
    logp = logsm.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:
        entropy = -(logsm.exp() * logsm).sum(-1).detach()
    return logp, entropy


class SampledLogProbs(LogitsProcessor):
    """Last in `generate`'s processor list: the log-softmax of the scores each token is sampled from.

    A call sees the scores of step t; the token sampled from them is the last input of the next
    call, so only one step's log-softmax is held (no (T, N, V) stack of `output_scores`).
    """

    def __init__(self) -> None:
        self.previous: Tensor | None = None
        self.taken: list[Tensor] = []

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.previous is not None:
            self.taken.append(self.previous.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.previous = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, last_tokens: Tensor) -> Tensor:
        """(N, T) log-probs, given the tokens sampled at the last step."""
        assert self.previous is not None, "generate() produced no token"
        self.taken.append(self.previous.gather(-1, last_tokens[:, None]).squeeze(-1))
        return torch.stack(self.taken, dim=1)


class TransformersRollout:
    """Sampling with `model.generate`: on the training model itself, or on a copy of it in `dtype`
    (`separate`), refreshed from the training model only when `generate` is called with `sync`.

    `top_k` (0: off) and `top_p` (1: off) restrict sampling to the most likely tokens; the
    recorded log-probs are then those of the renormalised distribution (what vLLM's
    `processed_logprobs` return), while the trainer's are of the full one.
    """

    def __init__(
        self,
        pad_id: int,
        eos_ids: list[int],
        max_new_tokens: int,
        temperature: float,
        top_k: int = 0,
        top_p: float = 1.0,
        dtype: torch.dtype | None = None,
        separate: bool = False,
    ) -> None:
        self.pad_id, self.eos_ids = pad_id, eos_ids
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.top_k, self.top_p = top_k, top_p
        self.dtype, self.separate = dtype, separate
        self.sampler: Any = None

    def _sampler(self, model: Any, sync: bool) -> Any:
        if not self.separate:
            return model
        if self.sampler is None:
            self.sampler = copy.deepcopy(model).to(self.dtype or next(model.parameters()).dtype).eval()
        elif sync:
            self.sampler.load_state_dict(model.state_dict())  # cast to the sampler's dtype
        return self.sampler

    @torch.no_grad()
    def generate(self, model: Any, prompt_ids: list[list[int]], group_size: int, sync: bool = True) -> Generation:
        sampler = self._sampler(model, sync)
        device = next(model.parameters()).device
        repeated = [p for p in prompt_ids for _ in range(group_size)]
        ids, mask = left_pad(repeated, self.pad_id, device)
        # Temperature, top-k and top-p are applied here rather than by `generate`, so the recorder
        # comes after them and sees the scores the tokens are drawn from.
        processors: list[LogitsProcessor] = []
        if self.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k > 0:
            processors.append(TopKLogitsWarper(self.top_k))
        if self.top_p < 1.0:
            processors.append(TopPLogitsWarper(self.top_p))
        recorder = SampledLogProbs()
        out = sampler.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            logits_processor=LogitsProcessorList([*processors, recorder]),
            max_new_tokens=self.max_new_tokens,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_ids,
        )
        width = ids.shape[1]
        completion = out[:, width:]
        rollout_logp = recorder.finish(completion[:, -1])  # (N, T)
        cmask = completion_mask(completion, self.eos_ids)
        cut = truncated(completion, cmask, self.eos_ids)
        completion = torch.where(cmask, completion, self.pad_id)
        full = torch.cat([ids, completion], dim=1)
        attn = torch.cat([mask, cmask.long()], dim=1)
        return Generation(full, attn, width, cmask, rollout_logp, cut)


class VLLMRollout:
    """Sampling with vLLM (`pip install mhpo[vllm]`, CUDA); weights pushed from the trainer each rollout."""

    def __init__(
        self,
        model_path: str,
        pad_id: int,
        eos_ids: list[int],
        max_new_tokens: int,
        temperature: float,
        seed: int,
        gpu_memory_utilization: float = 0.3,
        dtype: str = "float32",
        top_k: int = 0,
        top_p: float = 1.0,
    ) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # keep the engine in-process to load weights
        try:
            from vllm import LLM, SamplingParams
        except ImportError as exc:
            raise RuntimeError("rollout='vllm' needs vLLM: pip install 'mhpo[vllm]' (and a CUDA GPU)") from exc
        self.llm = LLM(
            model=model_path,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype,
            enforce_eager=True,
        )
        self._params = SamplingParams(
            n=1,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k if top_k > 0 else -1,
            max_tokens=max_new_tokens,
            logprobs=0,
        )
        self.pad_id, self.eos_ids = pad_id, eos_ids

    def _load_weights(self, model: Any) -> None:
        weights = list(model.state_dict().items())
        engine = self.llm.llm_engine
        executor = getattr(engine, "model_executor", None)
        if executor is not None and hasattr(executor, "driver_worker"):
            worker = executor.driver_worker
            runner = getattr(worker, "model_runner", None) or worker.worker.model_runner
            runner.model.load_weights(weights)
        else:
            self.llm.collective_rpc(lambda worker: worker.model_runner.model.load_weights(weights))
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    @torch.no_grad()
    def generate(self, model: Any, prompt_ids: list[list[int]], group_size: int, sync: bool = True) -> Generation:
        if sync:
            self._load_weights(model)
        repeated = [p for p in prompt_ids for _ in range(group_size)]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in repeated], self._params, use_tqdm=False)
        device = next(model.parameters()).device
        ids, mask = left_pad(repeated, self.pad_id, device)
        width = max(len(o.outputs[0].token_ids) for o in outputs)
        width = max(width, 1)
        comp = torch.full((len(outputs), width), self.pad_id, dtype=torch.long)
        elogp = torch.zeros((len(outputs), width))
        for i, o in enumerate(outputs):
            toks = list(o.outputs[0].token_ids)
            comp[i, : len(toks)] = torch.tensor(toks, dtype=torch.long)
            for t, (tok, lp) in enumerate(zip(toks, o.outputs[0].logprobs or [], strict=False)):
                elogp[i, t] = lp[tok].logprob
        comp = comp.to(device)
        cmask = completion_mask(comp, self.eos_ids) & (
            torch.arange(width, device=device)
            < torch.tensor([len(o.outputs[0].token_ids) for o in outputs], device=device).unsqueeze(1)
        )
        # vLLM says why a completion ended: "length" at max_tokens, "stop" at an end-of-sequence token
        cut = torch.tensor([o.outputs[0].finish_reason == "length" for o in outputs], device=device)
        comp = torch.where(cmask, comp, self.pad_id)
        full = torch.cat([ids, comp], dim=1)
        attn = torch.cat([mask, cmask.long()], dim=1)
        return Generation(full, attn, ids.shape[1], cmask, elogp.to(device), cut)
