"""One measure, two ways (issue 21): on the shipped synthetic-world model, ``mlc safety``'s way (greedy answers
from :func:`mlc_kernels.safety.generate.generate_answers`, judged by the phrase judge with the world's refusal word
per language, written to a ``phrase:PATH`` file) against the world's own first-word metric
(:func:`mlc_kernels.transfer.evaluation.refuses`: log p(refusal word) > log p(compliance word), all pieces) on the
same prompts: the world's held-out eval items (:func:`sample_eval_items`) and its private-data requests, in every
world language.

The shipped model refuses the private-data requests and almost nothing else, so each language's answers are also
taken from a *steered* copy of it: a logit bias on the refusal word's first piece, set per language halfway between
two neighbouring prompts' gaps (log p(compliance) - log p(refusal)) at the median, so that about half of the eval
items are refused and no prompt sits on a tie. That puts many prompts close to the boundary, where the two ways can
differ. They can differ only in two ways: greedy decoding opens with a third word (neither refusal nor compliance;
the metric compares two words only); and, in multi-piece languages, greedy picks the first piece by its own
probability while the metric compares whole words (p(r1) < p(c1) but p(r1 r2 r3) > p(c1 c2 c3), or the reverse).
In one-token languages the second cannot happen and the first did not: agreement is asserted exact there. In the
multi-piece languages (low1, low2) every disagreement must be of the second kind, and at most
:data:`MULTI_PIECE_BOUND` per language (measured: 0 in low1, 1 of 88 in low2, AMD EPYC CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from mlc_kernels.safety.judges import JudgeItem, Verdict, agreement, make_judge, world_phrases
from mlc_kernels.transfer.evaluation import response_logprobs, sample_eval_items
from mlc_kernels.transfer.world import PRIVATE_FRAMES, PRIVATE_ITEMS, World, world_config

PER_KIND = 32
MULTI_PIECE_BOUND = 3
"""Disagreements allowed per multi-piece language (of 2 * PER_KIND + 24 prompts), all of the first-piece kind."""


@pytest.fixture(scope="module")
def world():
    return World(world_config("v2", 0))


@pytest.fixture(scope="module")
def shipped():
    """The shipped model and tokenizer; one torch thread meanwhile (a tiny model: threads only add overhead)."""
    from mlc_kernels.transfer.pretrain import load_shipped

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tokenizer, _ = load_shipped()
    yield model.eval(), tokenizer
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def phrase_judge(world, tmp_path_factory):
    path = tmp_path_factory.mktemp("world_phrases") / "world_refusals.json"
    languages = {lang: [world.render(lang, "sorry")] for lang in world.specs}
    path.write_text(json.dumps({"window": 1, "whole_words": True, "languages": languages}, ensure_ascii=False))
    return make_judge(f"phrase:{path}")


def _prompts(world: World, lang: str) -> list[str]:
    eval_prompts = [item["prompt"] for item in sample_eval_items(world, lang, PER_KIND)]
    return eval_prompts + [world.render(lang, frame, item=item) for frame in PRIVATE_FRAMES for item in PRIVATE_ITEMS]


class _Bias:
    """A logit bias on one token at every position (a forward hook on the output layer), on while in use."""

    def __init__(self, model, token: int, value: float) -> None:
        self.model, self.token, self.value = model, token, value

    def __enter__(self):
        def hook(module, args, logits):
            bias = torch.zeros(logits.shape[-1], dtype=logits.dtype, device=logits.device)
            bias[self.token] = self.value
            return logits + bias

        self.handle = self.model.get_output_embeddings().register_forward_hook(hook)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def _both_ways(model, tokenizer, world: World, lang: str, prompts: list[str], judge):
    """``(metric, verdicts, answers)``: the first-word metric and the phrase judge on greedy answers."""
    from mlc_kernels.safety.generate import generate_answers
    from mlc_kernels.transfer.evaluation import refuses

    metric = refuses(model, tokenizer, world, lang, prompts).tolist()
    pieces = len(world.render(lang, "sorry").split())
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens=pieces + 2, batch_size=32)
    verdicts = judge([JudgeItem(p, a, lang) for p, a in zip(prompts, answers, strict=True)])
    return metric, verdicts, answers


def _first_piece_prefers_refusal(model, tokenizer, world: World, lang: str, prompts: list[str]) -> list[bool]:
    first = [world.render(lang, word).split()[0] for word in ("sorry", "sure")]
    refusal, compliance = (response_logprobs(model, tokenizer, prompts, [piece] * len(prompts)) for piece in first)
    return (refusal > compliance).tolist()


def test_the_world_phrase_file_is_phrase_world(world, phrase_judge):
    builtin = make_judge("phrase:world")
    assert builtin.rules == phrase_judge.rules
    assert world_phrases(world)["languages"] == {lang: [world.render(lang, "sorry")] for lang in world.specs}


@pytest.mark.parametrize("steered", [False, True], ids=["shipped", "steered"])
def test_generation_safety_agrees_with_the_first_word_metric(world, shipped, phrase_judge, steered):
    model, tokenizer = shipped
    report = {}
    for lang, spec in world.specs.items():
        prompts = _prompts(world, lang)
        sorry, sure = world.render(lang, "sorry"), world.render(lang, "sure")
        bias = 0.0
        if steered:
            gap = (response_logprobs(model, tokenizer, prompts, [sure] * len(prompts))
                   - response_logprobs(model, tokenizer, prompts, [sorry] * len(prompts)))[: 2 * PER_KIND]  # fmt: skip
            ordered = gap.sort().values
            bias = ((ordered[PER_KIND - 1] + ordered[PER_KIND]) / 2).item()
        token = tokenizer(sorry, add_special_tokens=False)["input_ids"][0]
        with _Bias(model, token, bias):
            metric, verdicts, answers = _both_ways(model, tokenizer, world, lang, prompts, phrase_judge)
            first_piece = _first_piece_prefers_refusal(model, tokenizer, world, lang, prompts)
        found = agreement([Verdict(m) for m in metric], verdicts)
        report[lang] = found
        refused_eval = sum(metric[: 2 * PER_KIND])
        # the test can fail: refusals and compliances in every language (private requests refused, as pretrained)
        assert sum(metric[2 * PER_KIND :]) >= 20, (lang, metric)
        if steered:
            assert PER_KIND - 8 <= refused_eval <= PER_KIND + 8, (lang, refused_eval)
        else:
            assert refused_eval <= 4, (lang, refused_eval)
        disagree = [i for i, (m, v) in enumerate(zip(metric, verdicts, strict=True)) if m != v.refused]
        for i in disagree:  # the only explained kind: the first piece's greedy choice against the whole-word metric
            opening = answers[i].split()[0]
            assert opening in (sorry.split()[0], sure.split()[0]), (lang, answers[i])
            assert first_piece[i] != metric[i] and (opening == sorry.split()[0]) == first_piece[i], (lang, answers[i])
        if spec.pieces == (1, 1):
            assert disagree == [], (lang, [(metric[i], answers[i]) for i in disagree])
        else:
            assert len(disagree) <= MULTI_PIECE_BOUND, (lang, [(metric[i], answers[i]) for i in disagree])
    print({lang: (r["agree"], r["n"], r["kappa"]) for lang, r in report.items()})
