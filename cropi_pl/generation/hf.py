"""Sampling Hugging Face models (our decode loop, or ``generate``): the engine that runs
everywhere, CPU included."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.nn.utils.rnn import pad_sequence
from transformers import DynamicCache, GenerationConfig, LogitsProcessor, LogitsProcessorList

from cropi_pl.generation.engine import Completion, GenerationEngine
from cropi_pl.kv_cache import cache_keyword, cache_rows


class SeededGumbelSampler(LogitsProcessor):
    """Exact temperature/top-p sampling by the Gumbel-max trick with one generator per row.

    ``argmax(logits / T + Gumbel)`` is a draw from ``softmax(logits / T)``. Drawing each row's noise
    from its own seeded generator makes every completion independent of which rows share its batch,
    so 1 process and N ranks sample the same completions for the same prompts.

    Noise is drawn ahead for up to ``max_steps`` steps, one ``rand`` call per row per block
    instead of per step (a generator's stream is the same either way), as long as the block stays
    within ``NOISE_BUDGET`` floats, so a large vocabulary still draws step by step.
    """

    NOISE_BUDGET = 1 << 22

    def __init__(
        self, seeds: list[int], temperature: float, top_p: float, max_steps: int = 1
    ) -> None:
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.temperature = temperature
        self.top_p = top_p
        self.max_steps = max_steps
        self._noise = torch.empty(len(seeds), 0, 0)
        self._next_step = 0

    def _gumbel(self, vocab: int) -> torch.Tensor:
        """This step's ``(rows, vocab)`` Gumbel noise, refilling the pre-drawn block when spent."""
        if self._next_step == self._noise.shape[1]:
            budget = self.NOISE_BUDGET // (len(self.generators) * vocab)
            steps = max(1, min(self.max_steps, budget))
            uniform = torch.stack([torch.rand(steps * vocab, generator=g) for g in self.generators])
            uniform = uniform.view(len(self.generators), steps, vocab)
            self._noise = -torch.log(-torch.log(uniform.clamp_min(1e-20)))
            self._next_step = 0
        self._next_step += 1
        return self._noise[:, self._next_step - 1]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return self.perturb(scores)

    def perturb(self, scores: Tensor, rows: Tensor | None = None) -> Tensor:
        """This step's perturbed scores of ``rows`` (indices into the seeds; None: every row),
        whose argmax is the draw; every row's noise advances, so dropped rows stay in step."""
        scores = scores.float() / self.temperature
        if self.top_p < 1.0:
            sorted_scores, order = scores.sort(dim=-1, descending=True)
            cumulative = sorted_scores.softmax(-1).cumsum(-1)
            drop_sorted = cumulative - sorted_scores.softmax(-1) >= self.top_p
            drop = drop_sorted.scatter(-1, order, drop_sorted)
            scores = scores.masked_fill(drop, float("-inf"))
        noise = self._gumbel(scores.shape[-1])
        return scores + (noise if rows is None else noise[rows]).to(scores.device)


def _is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def _shared_prefix_cache(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, num_samples: int
) -> DynamicCache:
    """The KV cache of every prompt but its last token, computed once per prompt and repeated
    for its ``num_samples`` rows (what ``generate`` would compute for each row again).

    Positions follow ``generate``'s own rule for left padding (``cumsum(mask) - 1``, pads at 0),
    so ``generate`` continues from this cache exactly as from its own prefill; it feeds the last
    prompt token itself, because its attention mask covers the whole prompt.
    """
    cache = DynamicCache()
    positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    model(
        input_ids=input_ids[:, :-1],
        attention_mask=attention_mask[:, :-1],
        position_ids=positions[:, :-1],
        use_cache=True,
        **{cache_keyword(model): cache},
    )
    cache.batch_repeat_interleave(num_samples)
    return cache


def _decode_dropping_finished(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    cache: DynamicCache,
    pick: Callable[[Tensor, Tensor], Tensor],
    max_new_tokens: int,
    eos_token_id: int,
) -> list[list[int]]:
    """Decode every row from ``cache`` (which holds all of its prompt but the last token), each
    row until its EOS or ``max_new_tokens``, the tokens ``pick(logits, rows)`` chooses; what
    follows a row's first EOS is filler, as in ``generate``'s output.

    ``generate`` steps every row until the longest is done; here finished rows leave the batch
    (their cache rows too) once they are a quarter of it, so the other rows stop paying for
    them. A row's inputs, positions (``generate``'s rule) and cache are the same either way.
    Only ``pick`` shapes the draw, not the processors a model's ``generation_config`` may add
    under ``generate`` (a repetition penalty, say), so rows sample the policy's own distribution.
    """
    rows = torch.arange(input_ids.shape[0])
    tokens = input_ids[:, -1:]
    positions = attention_mask.sum(-1, keepdim=True) - 1
    done = torch.zeros(len(rows), dtype=torch.bool)
    out = torch.full((len(rows), max_new_tokens), eos_token_id, dtype=torch.long)
    keyword = cache_keyword(model)
    for step in range(max_new_tokens):
        logits = model(
            input_ids=tokens,
            attention_mask=attention_mask,
            position_ids=positions,
            use_cache=True,
            **{keyword: cache},
        ).logits[:, -1]
        chosen = pick(logits, rows).cpu()
        out[rows, step] = chosen
        done |= chosen == eos_token_id
        if bool(done.all()):
            break
        if 4 * int(done.sum()) >= len(done):
            keep = (~done).nonzero().squeeze(1)
            cache = cache_rows(cache, keep.to(attention_mask.device))
            rows, chosen, done = rows[keep], chosen[keep], done[keep]
            attention_mask, positions = attention_mask[keep], positions[keep]
        tokens = chosen.to(input_ids.device)[:, None]
        positions = positions + 1
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], 1)
    return out.tolist()


class HFGenerateEngine(GenerationEngine):
    """Batched sampling over left-padded prompts, each prompt prefilled once, finished rows
    dropped from the decode batch.

    The ``num_samples`` completions of a prompt share its prompt, so its KV cache is computed once
    and repeated for them (:func:`_shared_prefix_cache`) instead of once per completion; the rows
    then decode in :func:`_decode_dropping_finished`, or in ``model.generate`` where it must run.

    Args:
        reproducible: sample through :class:`SeededGumbelSampler` (completions depend only on their
            seed); ``False`` uses ``generate``'s own sampler and the global RNG, which is faster for
            large vocabularies.
        batch_size: completions per ``generate`` call, to bound KV-cache memory (whole prompts:
            a prompt's completions are never split, so a call holds at least one prompt's).
        share_prompt_cache: prefill each prompt once for its completions; ``False`` prefills
            every completion's copy of the prompt (the plain ``generate`` call).
        drop_finished: with a shared prompt cache, decode in a loop that drops finished rows
            from the batch (:func:`_decode_dropping_finished`; the same tokens); ``False``, or a
            sharded model (its ranks must step together) or ``generate``'s own sampler, runs
            ``generate``, which steps every row until the longest is done.
    """

    def __init__(
        self,
        reproducible: bool = True,
        batch_size: int = 256,
        share_prompt_cache: bool = True,
        drop_finished: bool = True,
    ) -> None:
        self.reproducible = reproducible
        self.batch_size = batch_size
        self.share_prompt_cache = share_prompt_cache
        self.drop_finished = drop_finished

    def generate(
        self,
        model: nn.Module,
        prompts: list[list[int]],
        *,
        num_samples: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        eos_token_id: int,
        pad_token_id: int,
        seeds: list[int] | None = None,
    ) -> list[Completion]:
        if seeds is not None and len(seeds) != len(prompts) * num_samples:
            raise ValueError(
                f"expected {len(prompts) * num_samples} seeds (one per completion), "
                f"got {len(seeds)}"
            )
        per_call = max(1, self.batch_size // num_samples)
        out: list[Completion] = []
        # inference_mode skips autograd's bookkeeping, which small decode steps are dominated by
        # (only token lists leave this call); FSDP2 must not gather its parameters into inference
        # tensors, so sharded models decode under no_grad.
        with torch.no_grad() if _is_sharded(model) else torch.inference_mode():
            for start in range(0, len(prompts), per_call):
                chunk = prompts[start : start + per_call]
                rows = slice(start * num_samples, (start + len(chunk)) * num_samples)
                out.extend(
                    self._generate_chunk(
                        model,
                        chunk,
                        num_samples,
                        seeds[rows] if seeds else None,
                        max_new_tokens,
                        temperature,
                        top_p,
                        eos_token_id,
                        pad_token_id,
                    )
                )
        return out

    def _generate_chunk(
        self,
        model: nn.Module,
        prompts: list[list[int]],
        num_samples: int,
        seeds: list[int] | None,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        eos_token_id: int,
        pad_token_id: int,
    ) -> list[Completion]:
        device = next(model.parameters()).device
        input_ids = pad_sequence(
            [torch.tensor(p, dtype=torch.long) for p in prompts],
            batch_first=True,
            padding_value=pad_token_id,
            padding_side="left",
        ).to(device)
        attention_mask = pad_sequence(
            [torch.ones(len(p), dtype=torch.long) for p in prompts],
            batch_first=True,
            padding_value=0,
            padding_side="left",
        ).to(device)
        width = input_ids.shape[1]
        sampler = None
        if temperature > 0 and self.reproducible:
            if seeds is None:
                seeds = torch.randint(0, 2**62, (len(prompts) * num_samples,)).tolist()
            sampler = SeededGumbelSampler(seeds, temperature, top_p, max_new_tokens)
        was_training = model.training
        model.eval()
        try:
            decode_here = self.drop_finished and self.share_prompt_cache
            if decode_here and not _is_sharded(model) and (sampler or temperature == 0):
                cache = (
                    _shared_prefix_cache(model, input_ids, attention_mask, num_samples)
                    if width > 1
                    else DynamicCache()
                )
                rows = _decode_dropping_finished(
                    model,
                    input_ids.repeat_interleave(num_samples, dim=0),
                    attention_mask.repeat_interleave(num_samples, dim=0),
                    cache,
                    (lambda logits, r: sampler.perturb(logits, r).argmax(-1))
                    if sampler
                    else (lambda logits, _: logits.argmax(-1)),
                    max_new_tokens,
                    eos_token_id,
                )
            else:
                rows = self._generate_plain(
                    model,
                    input_ids,
                    attention_mask,
                    num_samples,
                    sampler,
                    max_new_tokens,
                    temperature,
                    top_p,
                    eos_token_id,
                    pad_token_id,
                )
        finally:
            model.train(was_training)
        completions = []
        for row in rows:
            if eos_token_id in row:
                completions.append(Completion(row[: row.index(eos_token_id) + 1], truncated=False))
            else:
                completions.append(Completion(row, truncated=True))
        return completions

    def _generate_plain(
        self,
        model: nn.Module,
        input_ids: Tensor,
        attention_mask: Tensor,
        num_samples: int,
        sampler: SeededGumbelSampler | None,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        eos_token_id: int,
        pad_token_id: int,
    ) -> list[list[int]]:
        """The ``generate`` call: for sharded models (``synced_gpus`` keeps every rank stepping
        until all are done), ``generate``'s own sampler, and without a shared prompt cache; none
        of the model's ``generation_config`` defaults apply."""
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            do_sample=False,
        )
        if temperature > 0 and sampler is None:
            config.do_sample, config.temperature, config.top_p = True, temperature, top_p
            config.top_k = 0
        cached = {}
        if self.share_prompt_cache and num_samples > 1 and input_ids.shape[1] > 1:
            cache = _shared_prefix_cache(model, input_ids, attention_mask, num_samples)
            cached[cache_keyword(model)] = cache
        # generate fills every setting left unset from the model's own generation_config (a
        # repetition penalty, say); the draws must come from the policy's distribution alone
        own, model.generation_config = model.generation_config, GenerationConfig()
        try:
            sequences = model.generate(
                input_ids=input_ids.repeat_interleave(num_samples, dim=0),
                attention_mask=attention_mask.repeat_interleave(num_samples, dim=0),
                generation_config=config,
                logits_processor=LogitsProcessorList([sampler] if sampler else []),
                synced_gpus=_is_sharded(model),
                **cached,
            )
        finally:
            model.generation_config = own
        return sequences[:, input_ids.shape[1] :].tolist()
