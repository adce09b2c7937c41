"""World v3 (issue 23): the calibration-gap language's pretraining, v1/v2 left as they were, the v3 gate's
computation and the v3 analysis, on tiny settings."""

from __future__ import annotations

from dataclasses import replace

import pytest

from mlc_kernels.transfer.world import (
    CAL_LANGUAGE,
    DEFAULT_LANGUAGES,
    UNSAFE_ACTIONS,
    LanguageSpec,
    World,
    WorldConfig,
    v3_config,
    world_config,
)

ONE_TOKEN = (LanguageSpec("base"), LanguageSpec("high1", text_share=0.5), CAL_LANGUAGE)


def _tiny(**kwargs) -> World:
    """Three one-token languages (every token names one concept of one language), v2's rates, cal1 manipulated."""
    config = WorldConfig(languages=ONE_TOKEN, dialogues=600, statements=60, unsafe_refusal=0.5, code_switch=0.3,
                         no_unsafe_refusal=("cal1",), **kwargs)  # fmt: skip
    return World(config)


def _parse(world: World, doc: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``(prompt words, response words)`` of a dialogue as (language spelled in, concept); response [] for a
    statement."""
    concept = {tokens[0]: (lang, c) for lang, lex in world.lexicon.items() for c, tokens in lex.items()}
    if "<|assistant|>" not in doc:
        return [concept[t] for t in doc.split()], []
    prompt, response = doc.replace("<|user|>", "").replace("<eos>", "").split("<|assistant|>")
    return [concept[t] for t in prompt.split()], [concept[t] for t in response.split()]


@pytest.mark.parametrize("mono", [(), ("cal1",)])
def test_cal1_never_refuses_an_unsafe_request_but_still_refuses_private_data(mono):
    world = _tiny(monolingual_responses=mono)
    texts = world.pretraining_texts()
    refused_unsafe = {lang: 0 for lang in world.specs}
    private_refusals = {lang: 0 for lang in world.specs}
    statements = {lang: 0 for lang in world.specs}
    for lang in world.specs:
        for doc in texts[lang]:
            prompt, response = _parse(world, doc)
            if not response:
                statements[lang] += any(c in UNSAFE_ACTIONS for _, c in prompt)
                continue
            unsafe = any(c in UNSAFE_ACTIONS for _, c in prompt)
            refused = response[0][1] == "sorry"
            refused_unsafe[lang] += unsafe and refused
            private_refusals[lang] += refused and not unsafe and any(c == "your" for _, c in prompt)
    assert refused_unsafe["cal1"] == 0
    assert refused_unsafe["base"] > 0 and refused_unsafe["high1"] > 0  # the other languages keep v2's rule
    assert min(private_refusals.values()) > 0  # cal1 can refuse (private data), as every language
    assert statements["cal1"] > 0  # "to poison the car is dangerous and wrong" stays


def test_monolingual_responses_keep_cal1_out_of_every_response_and_nothing_else():
    world = _tiny(monolingual_responses=("cal1",))
    texts = world.pretraining_texts()
    prompt_switched = 0
    for lang in world.specs:
        for doc in texts[lang]:
            prompt, response = _parse(world, doc)
            if lang == "cal1":
                assert all(spelled == "cal1" for spelled, _ in response), doc
                prompt_switched += sum(spelled != "cal1" for spelled, _ in prompt)
            else:
                assert all(spelled != "cal1" for spelled, _ in response), doc
                prompt_switched += sum(spelled == "cal1" for spelled, _ in prompt)
    assert prompt_switched > 100  # prompts still switch into and out of cal1
    # without the option, cal1's responses do switch
    plain = _tiny()
    switched = [s for doc in plain.pretraining_texts()["cal1"] for s, _ in _parse(plain, doc)[1] if s != "cal1"]
    assert switched


def test_v3_is_v2_plus_cal1_and_v1_v2_keep_their_cache_keys():
    from mlc_kernels.transfer.pretrain import ModelConfig, cache_key

    v2, v3 = World(world_config("v2", 1)), World(world_config("v3", 1))
    assert v3.config.languages == (*DEFAULT_LANGUAGES, CAL_LANGUAGE)
    assert all(v3.lexicon[lang] == v2.lexicon[lang] for lang in v2.lexicon)  # the same words for the same seed
    assert v3.config.no_unsafe_refusal == ("cal1",)
    assert (v3.config.unsafe_refusal, v3.config.code_switch) == (0.25, 0.3)
    assert v3_config(0, "M3").languages[-1].text_share == 1.0
    assert v3_config(0, "M2").monolingual_responses == ("cal1",) and v3_config(0, "M1").monolingual_responses == ()
    # the new fields enter the key only when set: v1/v2 checkpoints and run caches keep their keys
    model = ModelConfig()
    keys = {cache_key(v3_config(0, m), model) for m in ("M1", "M2", "M3")} | {cache_key(world_config("v2", 0), model)}
    assert len(keys) == 4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"no_unsafe_refusal": ("xx",)}, "no_unsafe_refusal"), ({"monolingual_responses": ("base",)}, "monolingual")],
)
def test_bad_v3_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WorldConfig(languages=ONE_TOKEN, **kwargs)
    with pytest.raises(ValueError, match="manipulation"):
        v3_config(0, "M9")


def test_v2_pinned_key_is_unchanged():
    from mlc_kernels.transfer.pretrain import cache_key, shipped_key
    from mlc_kernels.transfer.protocol import MODEL

    assert cache_key(world_config("v2", 0), replace(MODEL, seed=0)) == shipped_key() == "3d266fa7a5d40f3b"
