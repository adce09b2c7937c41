"""``mlc transfer``: the synthetic world's properties, and a smoke run of the whole pipeline (tiny world)."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from mlc_kernels.sample_data import validate_records
from mlc_kernels.transfer.world import (
    TRAIN_FRAMES,
    LanguageSpec,
    World,
    WorldConfig,
    world_tokenizer,
)

FINAL_LINE = re.compile(
    r"^transfer: dpo=(\d+\.\d) dpo\+mlc=(\d+\.\d) benign_dpo=(\d+\.\d) benign_dpo\+mlc=(\d+\.\d)$"
)


@pytest.fixture(scope="module")
def world() -> World:
    return World(WorldConfig())


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_languages_have_disjoint_token_ids(world):
    tokenizer = world_tokenizer(world)
    texts = world.pretraining_texts()
    ids = {}
    for lang in (spec.code for spec in world.config.languages):
        plain = [t.replace("<|user|>", "").replace("<|assistant|>", "").replace("<eos>", "") for t in texts[lang]]
        ids[lang] = {i for text in plain for i in _ids(tokenizer, text)}
        assert tokenizer.unk_token_id not in ids[lang]
    langs = list(ids)
    for i, a in enumerate(langs):
        for b in langs[i + 1 :]:
            assert not ids[a] & ids[b], (a, b)


def test_word_order_differs(world):
    def positions(lang: str) -> tuple[int, int]:
        tokens = world.request(lang, TRAIN_FRAMES[1], "poison", "car").split()
        verb, obj = world.lexicon[lang]["poison"][0], world.lexicon[lang]["car"][0]
        return tokens.index(verb), tokens.index(obj)

    base_verb, base_obj = positions("base")
    assert base_verb < base_obj
    verb, obj = positions("high2")  # sov
    assert verb > obj
    assert positions("high1") == (base_verb, base_obj)  # svo


def test_reversed_language_reverses_each_clause(world):
    forward = world.render("low1", "how can i V the O", "poison", "car")  # low1: svo, same pieces scheme
    reversed_words = world.render("low2", "how can i V the O", "poison", "car")
    words = ["how", "can", "i", "poison", "the", "car"]
    assert reversed_words == " ".join(t for w in reversed(words) for t in world.lexicon["low2"][w])
    assert forward == " ".join(t for w in words for t in world.lexicon["low1"][w])


def test_low_resource_languages_tokenise_longer(world):
    tokenizer = world_tokenizer(world)
    records = world.alignment_records()[:50]
    base = sum(len(_ids(tokenizer, r["prompt"])) for r in records)
    for lang in ("low1", "low2"):
        assert sum(len(_ids(tokenizer, r["variants"][lang])) for r in records) >= 1.5 * base
    for lang in ("high1", "high2"):
        assert sum(len(_ids(tokenizer, r["variants"][lang])) for r in records) == base


def test_low_resource_languages_get_less_text(world):
    counts = {lang: len(texts) for lang, texts in world.pretraining_texts().items()}
    assert counts["base"] > counts["high1"] > counts["low1"] > counts["low2"]
    assert counts["low2"] <= 0.06 * counts["base"]
    assert counts["parallel"] == 0  # monolingual by default


def test_world_is_deterministic_from_the_seed():
    a, b, c = World(WorldConfig(seed=3)), World(WorldConfig(seed=3)), World(WorldConfig(seed=4))
    assert a.lexicon == b.lexicon and a.pretraining_texts() == b.pretraining_texts()
    assert a.alignment_records() == b.alignment_records()
    assert a.lexicon != c.lexicon


def test_parallel_text_option():
    texts = World(WorldConfig(parallel_share=0.1)).pretraining_texts()
    assert texts["parallel"] and all(" <=> " in t for t in texts["parallel"])


def test_alignment_records_are_base_language_only(world):
    records = world.alignment_records()
    validate_records(records, "dpo")
    validate_records(records, "sft")
    base_vocab = {tok for word in world.lexicon["base"].values() for tok in word}
    for r in records[:20]:
        assert set(r["variants"]) == set(world.config.derived)
        for field in ("prompt", "chosen", "rejected", "completion"):
            assert set(r[field].split()) <= base_vocab
        assert (r["chosen"] == world.refusal("base")) == (r["kind"] == "unsafe")
    heldout = {r["prompt"] for r in world.heldout_records()}
    assert not heldout & {r["prompt"] for r in records}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"languages": (LanguageSpec("base"),)}, "languages"),
        ({"languages": (LanguageSpec("base"), LanguageSpec("x", order="vso"))}, "order"),
        ({"languages": (LanguageSpec("base"), LanguageSpec("x", pieces=(2, 5)))}, "pieces"),
        ({"languages": (LanguageSpec("base"), LanguageSpec("x", text_share=0))}, "text_share"),
    ],
)
def test_bad_world_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WorldConfig(**kwargs)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--seeds", "a,b"], "--seeds"),
        (["--mlc-layer", "9"], "--mlc-layer"),
        (["--mlc-weight", "-1"], "--mlc-weight"),
        (["--mlc-tau", "0"], "--mlc-tau"),
        (["--threads", "0"], "--threads"),
    ],
)
def test_bad_cli_input_names_the_argument(argv, match, tmp_path):
    pytest.importorskip("trl")
    from mlc_kernels.cli import main

    with pytest.raises(SystemExit, match=match):
        main(["transfer", "--quick", "--no-cache", "--out", str(tmp_path), *argv])


def test_training_items_are_the_trained_prompts_in_each_language(world):
    from mlc_kernels.transfer.evaluation import training_items

    records = world.alignment_records()[:5]
    assert [i["prompt"] for i in training_items(world, "base", 5)] == [r["prompt"] for r in records]
    assert [i["prompt"] for i in training_items(world, "low1", 5)] == [r["variants"]["low1"] for r in records]


@pytest.mark.parametrize(
    "argv, match",
    [(["--layers", "7"], "--layers"), (["--weights", "x"], "--weights"), (["--taus", "0"], "--taus"),
     (["--parallel-share", "2"], "--parallel-share"), (["--pretrain-steps", "0"], "--pretrain-steps")],
)  # fmt: skip
def test_bad_study_input_names_the_argument(argv, match):
    from mlc_kernels.transfer.study import main

    with pytest.raises(SystemExit, match=match):
        main(argv)


def test_smoke_pipeline_writes_the_table_and_the_last_line(tmp_path):
    pytest.importorskip("trl")
    from mlc_kernels.transfer.experiment import QUICK, report
    from mlc_kernels.transfer.pretrain import ModelConfig

    config = replace(
        QUICK,
        world=WorldConfig(dialogues=120, statements=40),
        model=ModelConfig(hidden_size=32, intermediate_size=64, steps=10, batch_size=8),
        align=replace(QUICK.align, dpo_steps=2, sft_steps=2, batch_size=4, train_prompts=8, eval_per_kind=4,
                      consistency_prompts=6, mlc_rep_size=8),  # fmt: skip
        seeds=(0,),
    )
    lines: list[str] = []
    line = report(config, tmp_path, tmp_path / "cache", command="smoke", log=lines.append)
    assert lines[-1] == line
    match = FINAL_LINE.match(line)
    assert match, line
    assert all(0.0 <= float(v) <= 100.0 for v in match.groups())
    table = (tmp_path / "transfer_table.txt").read_text()
    for row in ("base model", "dpo", "dpo+mlc", "sft", "sft+mlc", "between"):
        assert row in table
    assert (tmp_path / "transfer.png").stat().st_size > 1000
    csv_lines = (tmp_path / "transfer.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 5 * 1 * 5  # header + rows x seeds x languages
    for row in csv_lines[1:]:
        assert all(0.0 <= float(v) <= 100.0 for v in row.split(",")[3:])
    # the second run loads the cached checkpoint
    lines.clear()
    report(config, tmp_path, tmp_path / "cache", log=lines.append)
    assert any("cached" in entry for entry in lines)
    # the study's diagnostic of shared directions, on the same checkpoint
    from mlc_kernels.transfer.pretrain import pretrained
    from mlc_kernels.transfer.study import format_directions, shared_directions

    world = World(config.world)
    model, tokenizer, cached = pretrained(world, config.model, tmp_path / "cache", log=lines.append)
    directions = shared_directions(model, tokenizer, world)
    assert cached and set(directions) == {1, 2, 3, 4}
    assert directions[2]["unsafe_minus_benign"]["base"] == pytest.approx(1.0)
    assert "private_minus_request" in format_directions(directions)
