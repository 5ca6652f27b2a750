"""Seeded Gumbel-max sampling: exact distribution, block noise, batch-independent completions."""

from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cropi_pl.generation import HFGenerateEngine
from cropi_pl.generation.hf import SeededGumbelSampler
from cropi_pl.policy.build import resolve_model_path
from cropi_pl.seeding import derive_seed


def test_block_drawn_noise_equals_step_by_step():
    seeds = torch.randint(0, 2**62, (5,)).tolist()
    block = SeededGumbelSampler(seeds, 0.7, 0.9, max_steps=30)
    step = SeededGumbelSampler(seeds, 0.7, 0.9, max_steps=1)
    for _ in range(30):
        scores = torch.randn(5, 50)
        assert torch.equal(block(None, scores), step(None, scores))


def test_perturbing_some_rows_gives_them_the_noise_of_the_full_batch():
    """Rows that stay in a batch others left draw the noise they would have drawn beside them."""
    seeds = torch.randint(0, 2**62, (5,)).tolist()
    full = SeededGumbelSampler(seeds, 0.7, 0.9, max_steps=4)
    some = SeededGumbelSampler(seeds, 0.7, 0.9, max_steps=4)
    rows = torch.tensor([4, 1])
    for _ in range(9):
        scores = torch.randn(5, 50)
        assert torch.equal(full(None, scores)[rows], some.perturb(scores[rows], rows))


def _softmax_top_p(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Brute force: keep the smallest prefix of sorted probabilities whose mass reaches top_p."""
    probs = torch.softmax(logits.double() / temperature, -1)
    order = probs.argsort(descending=True).tolist()
    kept, mass = [], 0.0
    for i in order:
        if mass >= top_p:
            break
        kept.append(i)
        mass += float(probs[i])
    out = torch.zeros_like(probs)
    out[kept] = probs[kept]
    return out / out.sum()


def test_gumbel_sampling_matches_softmax_with_temperature_and_top_p():
    logits = torch.randn(6) * 2
    for temperature, top_p in ((1.0, 1.0), (0.5, 1.0), (1.3, 0.8)):
        n = 40000
        sampler = SeededGumbelSampler(list(range(n)), temperature, top_p, max_steps=1)
        draws = sampler(None, logits.expand(n, -1)).argmax(-1)
        freq = torch.bincount(draws, minlength=6).double() / n
        expected = _softmax_top_p(logits, temperature, top_p)
        assert (freq[expected == 0] == 0).all()
        torch.testing.assert_close(freq, expected, atol=0.012, rtol=0)  # ~5 sigma at n=40k


def _tiny_policy(*texts: str) -> tuple[Any, torch.nn.Module, list[list[int]]]:
    """The embedded tiny policy's tokenizer, the policy, and ``texts`` encoded as prompts."""
    path = resolve_model_path("embedded:tiny")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    return tok, model, [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def _sampling(tok: Any, **settings: Any) -> dict[str, Any]:
    """``generate`` keyword arguments: ``tok``'s eos and pad ids, no top-p cut, ``settings``."""
    return dict(top_p=1.0, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **settings)


def test_completions_do_not_depend_on_batch_composition():
    tok, model, prompts = _tiny_policy("Q: 12+7\nA: ", "Q: 345 mod 7\nA: ", "Q: 9*8\nA: ")
    seeds = [derive_seed(0, "t", i, j) for i in range(3) for j in range(2)]
    kwargs = _sampling(tok, max_new_tokens=16, temperature=1.0)
    together = HFGenerateEngine().generate(model, prompts, num_samples=2, seeds=seeds, **kwargs)
    alone = [
        c
        for i in range(3)
        for c in HFGenerateEngine().generate(
            model, prompts[i : i + 1], num_samples=2, seeds=seeds[2 * i : 2 * i + 2], **kwargs
        )
    ]
    assert [c.ids for c in together] == [c.ids for c in alone]
    assert len({tuple(c.ids) for c in together}) > 1


def _brute_force_sample(
    model: torch.nn.Module, prompt: list[int], seed: int, steps: int, temperature: float, eos: int
) -> list[int]:
    """One completion by full forwards over the growing sequence (no cache, no padding, no
    batch), drawing the same per-row Gumbel noise as the engine."""
    sampler = SeededGumbelSampler([seed], temperature, 1.0, max_steps=steps)
    tokens: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([prompt + tokens])).logits[:, -1]
            scores = logits.argmax(-1) if temperature == 0 else sampler(None, logits).argmax(-1)
            tokens.append(int(scores))
            if tokens[-1] == eos:
                break
    return tokens


def test_shared_prompt_cache_equals_per_completion_prefill_and_brute_force():
    """Prefilling each prompt once for its completions, and decoding with finished rows dropped
    from the batch, gives the tokens of the plain batched ``generate`` call, of ``generate`` from
    the shared cache and of a cache-free loop per completion, greedy and sampled, for prompts of
    different lengths (left padding) and calls split across prompts."""
    texts = ("Q: 12+7\nA: ", "Q: 345 mod 7\nA: ", "Q: 9*8\nA: ", "Q: max(13,31)\nA: ")
    tok, model, prompts = _tiny_policy(*texts)
    assert len({len(p) for p in prompts}) > 1
    samples, steps = 3, 17
    seeds = [derive_seed(1, "t", i, j) for i in range(len(prompts)) for j in range(samples)]
    common = _sampling(tok, num_samples=samples, max_new_tokens=steps, seeds=seeds)
    widths: list[tuple[int, int]] = []
    model.model.register_forward_pre_hook(
        lambda _, args, kwargs: widths.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    for temperature in (1.0, 0.0):
        plain = HFGenerateEngine(share_prompt_cache=False).generate(
            model, prompts, temperature=temperature, **common
        )
        widths.clear()
        shared = HFGenerateEngine().generate(model, prompts, temperature=temperature, **common)
        width = max(map(len, prompts))  # one prefill per prompt, then one token per completion
        assert widths[:2] == [(len(prompts), width - 1), (len(prompts) * samples, 1)]
        rows = [r for r, _ in widths[1:]]
        assert rows == sorted(rows, reverse=True) and rows[-1] < rows[0]  # finished rows left
        stepped = HFGenerateEngine(drop_finished=False).generate(
            model, prompts, temperature=temperature, **common
        )
        split = HFGenerateEngine(batch_size=2 * samples).generate(
            model, prompts, temperature=temperature, **common
        )
        brute = [
            _brute_force_sample(model, p, seed, steps, temperature, tok.eos_token_id)
            for p, seed in zip([p for p in prompts for _ in range(samples)], seeds, strict=True)
        ]
        assert [c.ids for c in shared] == [c.ids for c in plain] == [c.ids for c in split]
        assert [c.ids for c in shared] == [c.ids for c in stepped]
        assert [c.ids for c in shared] == brute
        assert [c.truncated for c in shared] == [c.ids[-1] != tok.eos_token_id for c in shared]
        assert {c.truncated for c in shared} == {True, False}  # rows ended both ways
        if temperature > 0:
            assert len({tuple(c.ids) for c in shared}) > len(prompts)  # samples differ


def test_a_model_generation_config_does_not_bias_the_draws():
    """Every decode path samples the policy's own distribution: a repetition penalty and an
    n-gram ban in the model's ``generation_config`` (which ``generate`` would otherwise apply)
    change no token, and the model's config is left as it was."""
    tok, model, prompts = _tiny_policy("Q: 77*88\nA: ", "Q: 9+9\nA: ")
    seeds = [derive_seed(2, "t", i, j) for i in range(2) for j in range(2)]
    common = _sampling(tok, num_samples=2, max_new_tokens=16, seeds=seeds)
    for temperature in (1.0, 0.0):
        clean = HFGenerateEngine().generate(model, prompts, temperature=temperature, **common)
        model.generation_config.repetition_penalty = 5.0
        model.generation_config.no_repeat_ngram_size = 1
        for engine in (HFGenerateEngine(), HFGenerateEngine(drop_finished=False)):
            got = engine.generate(model, prompts, temperature=temperature, **common)
            assert [c.ids for c in got] == [c.ids for c in clean]
        assert model.generation_config.repetition_penalty == 5.0
        assert any(len(set(c.ids)) < len(c.ids) for c in clean)  # tokens repeat: a ban would bite
        model.generation_config.repetition_penalty = None
        model.generation_config.no_repeat_ngram_size = None


def test_the_hf_engine_overlay_sets_every_knob_at_its_default(tmp_path):
    """``configs/engine/hf.yaml`` parses through the real CLI and builds the default engine."""
    from cropi_pl.cli import main
    from tests.cli_utils import ROOT, TINY

    overlay = ROOT / "configs" / "engine" / "hf.yaml"
    cli = main(
        ["--config", str(TINY), "--config", str(overlay), f"--trainer.default_root_dir={tmp_path}"],
        run=False,
    )
    engine, default = cli.model.engine, HFGenerateEngine()
    assert type(engine) is HFGenerateEngine and vars(engine) == vars(default)
    flipped = main(
        ["--config", str(TINY), "--config", str(overlay), f"--trainer.default_root_dir={tmp_path}"]
        + ["--model.init_args.engine.init_args.drop_finished=false"],
        run=False,
    ).model.engine
    assert flipped.drop_finished is False and flipped.share_prompt_cache is True
