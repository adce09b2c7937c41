"""``mlc transfer``: the synthetic world's properties, and smoke runs of the v2 comparison and of the retired v1
protocol (``experiments/transfer/``, from the checkout) on tiny worlds."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest

from mlc_kernels.sample_data import validate_records
from mlc_kernels.transfer.world import (
    REFUSAL,
    TRAIN_FRAMES,
    LanguageSpec,
    World,
    WorldConfig,
    world_config,
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
        (["--world", "v4"], "--world must be v2 or v3, got 'v4'"),
        (["--world-seed", "-1"], "--world-seed"),
        (["--world", "v1"], "--world v1 is retired; .* python -m experiments.transfer.v1"),
        (["--workers", "0"], "--workers"),
    ],
)
def test_bad_cli_input_names_the_argument(argv, match, tmp_path, capsys):
    pytest.importorskip("trl")
    from mlc_kernels.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["transfer", "--quick", "--no-cache", "--out", str(tmp_path), *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert re.match(f"mlc transfer: error: {match}", err), err


@pytest.mark.parametrize(
    "argv, match",
    [(["--seeds", "a,b"], "--seeds"), (["--mlc-layer", "9"], "--mlc-layer"), (["--mlc-weight", "-1"], "--mlc-weight"),
     (["--mlc-tau", "0"], "--mlc-tau"), (["--threads", "0"], "--threads"), (["--world-seed", "-1"], "--world-seed")],
)  # fmt: skip
def test_bad_v1_input_names_the_argument(argv, match, tmp_path, capsys):
    from experiments.transfer.v1 import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--quick", "--no-cache", "--out", str(tmp_path), *argv])
    assert exit_info.value.code == 2 and f"error: {match}" in capsys.readouterr().err


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
    from experiments.transfer.study import main

    with pytest.raises(SystemExit, match=match):
        main(argv)


def test_smoke_pipeline_writes_the_table_and_the_last_line(tmp_path):
    pytest.importorskip("trl")
    from experiments.transfer.v1 import QUICK, report
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
    # the last line is the CSV's means over the non-base languages (dpo / dpo+mlc safety, helpfulness)
    import csv

    with open(tmp_path / "transfer.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["language"] != "base"]

    def mean(row: str, metric: str) -> float:
        values = [float(r[metric]) for r in rows if r["row"] == row]
        return sum(values) / len(values)

    expected = (mean("dpo", "safety"), mean("dpo+mlc", "safety"), mean("dpo", "helpfulness"),
                mean("dpo+mlc", "helpfulness"))  # fmt: skip
    assert [float(v) for v in match.groups()] == [pytest.approx(v, abs=0.051) for v in expected]
    table = (tmp_path / "transfer_table.txt").read_text()
    for row in ("base model", "dpo", "dpo+mlc", "sft", "sft+mlc", "between"):
        assert row in table
    assert (tmp_path / "transfer.png").stat().st_size > 1000
    csv_lines = (tmp_path / "transfer.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 5 * 1 * 5  # header + rows x seeds x languages
    assert {row.split(",")[0] for row in csv_lines[1:]} == {"base model", "dpo", "dpo+mlc", "sft", "sft+mlc"}
    # the second run loads the cached checkpoint
    lines.clear()
    report(config, tmp_path, tmp_path / "cache", log=lines.append)
    assert any("cached" in entry for entry in lines)
    # the study's diagnostic of shared directions, on the same checkpoint
    from experiments.transfer.study import format_directions, shared_directions
    from mlc_kernels.transfer.pretrain import pretrained

    world = World(config.world)
    model, tokenizer, cached = pretrained(world, config.model, tmp_path / "cache", log=lines.append)
    directions = shared_directions(model, tokenizer, world)
    assert cached and set(directions) == {1, 2, 3, 4}
    assert directions[2]["unsafe_minus_benign"]["base"] == pytest.approx(1.0)
    assert "private_minus_request" in format_directions(directions)


V1_CORPUS_SHA256 = "96542c34b1ba6e2ef2fe83224bf4adde0da69560da3e919dd9ad57221388f5ee"


def test_v1_corpus_is_unchanged():
    import hashlib
    import json

    texts = World(world_config("v1", 0)).pretraining_texts()
    assert hashlib.sha256(json.dumps(texts, sort_keys=True).encode()).hexdigest() == V1_CORPUS_SHA256


def test_v2_code_switches_words_at_the_set_rate_and_keeps_the_order():
    import random

    world = World(world_config("v2", 0))
    rng = random.Random(0)
    switched = total = 0
    for lang in ("base", "high2", "low2"):
        plain = world.words(lang, TRAIN_FRAMES[0], "poison", "car")
        for _ in range(400):
            words = world.words(lang, TRAIN_FRAMES[0], "poison", "car", switch=rng)
            assert [w for _, w in words] == [w for _, w in plain]  # the matrix language's order
            switched += sum(spelled != lang for spelled, _ in words)
            total += len(words)
    assert abs(switched / total - 0.3) < 0.02
    assert world.render("base", TRAIN_FRAMES[0], "poison", "car") == world.request("base", TRAIN_FRAMES[0], "poison",
                                                                                   "car")  # fmt: skip


def test_v2_refuses_some_unsafe_requests_never_benign_ones():
    world = World(world_config("v2", 0))
    texts = world.pretraining_texts()
    stats = world.pretraining_stats
    assert abs(stats["unsafe_refused"] / stats["unsafe"] - world.config.unsafe_refusal) < 0.03
    sorry = {world.lexicon[lang]["sorry"] for lang in world.specs}
    opens_with_sorry = 0
    for lang in world.specs:
        for doc in texts[lang]:
            if "<|assistant|>" in doc:
                response = tuple(doc.split("<|assistant|>")[1].split())
                opens_with_sorry += any(response[: len(s)] == s for s in sorry)
    # every refusal opens with "sorry" (in some language): private-data requests + the refused unsafe ones
    assert opens_with_sorry == stats["private"] + stats["unsafe_refused"]
    assert REFUSAL[0].split()[0] == "sorry"


def test_gate_on_a_tiny_world():
    from mlc_kernels.transfer.gate import THRESHOLDS, format_gate, measure, mlc_layer, summarise
    from mlc_kernels.transfer.pretrain import new_model

    world = World(WorldConfig(dialogues=60, statements=20, unsafe_refusal=0.15, code_switch=0.3))
    tokenizer = world_tokenizer(world)
    from mlc_kernels.transfer.pretrain import ModelConfig

    model = new_model(len(tokenizer), ModelConfig(hidden_size=16, intermediate_size=32, layers=2, heads=2)).eval()
    run = measure(model, tokenizer, world, train_prompts=32, test_prompts=16)
    languages = [lang.code for lang in world.config.languages]
    assert set(run["probe"]) == {1, 2} and set(run["probe"][1]) == set(languages)
    summary = summarise([run, run], languages)
    assert summary["transfer"]["high1"] == pytest.approx(statistics_mean(run["probe"], "high1"))
    assert summary["checks"]["base_safety_max"] == (summary["worst_base_safety"] <= THRESHOLDS["base_safety_max"])
    assert summary["passed"] == all(summary["checks"].values())
    assert "gate=" in format_gate(summary, languages, [0, 1])
    # the layer rule: readable layers only, the best mean transfer, ties to the lower layer
    per_layer = {1: {"base_probe": 0.95, "transfer": 0.7}, 2: {"base_probe": 0.85, "transfer": 0.9},
                 3: {"base_probe": 0.97, "transfer": 0.7}}  # fmt: skip
    assert mlc_layer(per_layer) == 1
    per_layer[3]["transfer"] = 0.8
    assert mlc_layer(per_layer) == 3


def statistics_mean(by_layer: dict, lang: str) -> float:
    return sum(by_layer[layer][lang] for layer in by_layer) / len(by_layer)


def test_refusal_metric_outcome():
    """A model that refuses unsafe requests in the base language only (and answers everything in high1) scores
    100% safety and helpfulness in base and 0% safety in high1: catches an inverted refusal comparison in
    ``evaluation.refuses``, which the shape-only checks pass. The model is a rule (logits over the
    vocabulary favour the base "sorry" after a base unsafe action word, else "sure"), so the test is instant."""
    from types import SimpleNamespace

    import torch

    from mlc_kernels.transfer.evaluation import behaviour
    from mlc_kernels.transfer.world import UNSAFE_ACTIONS

    world = World(WorldConfig(languages=(LanguageSpec("base"), LanguageSpec("high1"))))
    tokenizer = world_tokenizer(world)
    vocab = tokenizer.get_vocab()
    unsafe = torch.tensor([vocab[world.lexicon["base"][a][0]] for a in UNSAFE_ACTIONS])
    sorry = [vocab[world.lexicon[lang]["sorry"][0]] for lang in ("base", "high1")]
    sure = [vocab[world.lexicon[lang]["sure"][0]] for lang in ("base", "high1")]

    class RefusesInBase(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, use_cache=False):
            logits = torch.zeros(*input_ids.shape, len(vocab))
            refuse = torch.isin(input_ids, unsafe).any(dim=1)
            logits[refuse, :, sorry[0]] = 5.0
            logits[~refuse, :, sure[0]] = 5.0
            logits[:, :, sure[1]] = 5.0
            return SimpleNamespace(logits=logits)

    result = behaviour(RefusesInBase(), tokenizer, world, per_kind=32)
    assert result["base"]["safety"] == 100 and result["base"]["helpfulness"] == 100, result
    assert result["high1"]["safety"] == 0 and result["high1"]["helpfulness"] == 100, result


V2_LINE = re.compile(
    r"^transfer: world=v2 gate=(pass|fail) dpo=(-?\d+\.\d) dpo\+mlc=(-?\d+\.\d) guard=(\S+) "
    r"min_gain=(-?\d+\.\d) base_dpo=(\d+\.\d) base_dpo\+mlc=(\d+\.\d)$"
)


def test_v2_smoke_pipeline_prints_the_last_line(tmp_path):
    pytest.importorskip("trl")
    from mlc_kernels.transfer.pretrain import ModelConfig
    from mlc_kernels.transfer.protocol import QUICK, Condition
    from mlc_kernels.transfer.v2 import report

    config = replace(
        QUICK,
        model=ModelConfig(hidden_size=16, intermediate_size=32, layers=2, heads=2, steps=4, batch_size=4),
        align=replace(QUICK.align, dpo_steps=2, batch_size=4, train_prompts=8, eval_per_kind=4,
                      consistency_prompts=6, mlc_rep_size=8, mlc_layer=0),  # fmt: skip  (0: the run's own gate rule)
        conditions=(Condition("sv_softmax"), Condition("frozen", extractor="centred", lead_steps=1)),
        seeds=(0,), gate_train_prompts=32, gate_test_prompts=16,
    )  # fmt: skip
    lines: list[str] = []
    line = report(config, tmp_path, tmp_path / "cache", command="smoke", log=lines.append)
    curves = json.loads((tmp_path / "transfer_v2.json").read_text())["curves"]
    last_step = {name: max(e["step"] for e in runs["w0s0"]) for name, runs in curves.items()}
    assert last_step == {"dpo": 2, "sv_softmax": 2, "frozen": 3}  # lead_steps: one MLC-only step before the two
    assert lines[-1] == line
    match = V2_LINE.match(line)
    assert match, line
    assert match.group(4) in ("sv_softmax", "frozen")
    text = (tmp_path / "transfer_v2.txt").read_text()
    assert "pre-condition gate" in text and "collapse diagnostics" in text
    csv_lines = (tmp_path / "transfer_v2.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 4 * 1 * 5  # header + rows (base model, dpo, 2 conditions) x seeds x languages
    assert (tmp_path / "transfer_v2.png").stat().st_size > 1000
    assert (tmp_path / "transfer_v2_steps.png").stat().st_size > 1000
    # the per-run cache: a second report reads every run back and prints the same line
    assert len(list((tmp_path / "cache" / "runs").glob("*.json"))) == 3
    assert report(config, tmp_path, tmp_path / "cache", log=lines.append) == line
    # two worker processes (one thread each, as the serial runs here) give the same runs
    import shutil

    shutil.copytree(tmp_path / "cache", tmp_path / "cache2", ignore=shutil.ignore_patterns("runs"))
    out2 = tmp_path / "parallel"
    assert report(config, out2, tmp_path / "cache2", log=lines.append, workers=2, threads=1) == line
    assert (out2 / "transfer_v2.csv").read_text() == (tmp_path / "transfer_v2.csv").read_text()
    assert len(list((tmp_path / "cache2" / "runs").glob("*.json"))) == 3


def test_the_shipped_checkpoint_stands_in_for_its_own_pretraining(tmp_path, monkeypatch):
    from mlc_kernels.transfer import pretrain
    from mlc_kernels.transfer.protocol import MODEL

    def no_pretraining(*args, **kwargs):
        raise AssertionError("pretrained from scratch")

    monkeypatch.setattr(pretrain, "pretrain", no_pretraining)
    world = World(world_config("v2", 0))
    lines: list[str] = []
    model, _, loaded = pretrain.pretrained(world, MODEL, tmp_path, log=lines.append)
    assert loaded and "shipped" in lines[0] and model.config.num_hidden_layers == MODEL.layers
    with pytest.raises(AssertionError, match="from scratch"):  # another config, or shipped=False: pretraining
        pretrain.pretrained(world, MODEL, tmp_path, log=lines.append, shipped=False)
    with pytest.raises(AssertionError, match="from scratch"):
        pretrain.pretrained(World(world_config("v2", 1)), replace(MODEL, seed=1), tmp_path, log=lines.append)


def test_precision_keys_only_the_new_runs():
    """Issue 20, finding 6: the demo aligns in fp32 (``AlignConfig.precision``); the recorded runs (TRL's bf16
    default) keep their cache keys, an fp32 run gets its own, and an unknown precision is refused."""
    import hashlib
    from dataclasses import asdict

    from mlc_kernels.transfer.align import align_model
    from mlc_kernels.transfer.pretrain import cache_key
    from mlc_kernels.transfer.protocol import ALIGN, MODEL
    from mlc_kernels.transfer.runs import run_key

    config = world_config("v2", 0)
    settings = {k: v for k, v in asdict(ALIGN).items() if k not in ("precision", "mlc_lead_steps", "mlc_aux_every")}
    blob = json.dumps({"ckpt": cache_key(config, MODEL), "condition": "dpo", "align": settings, "seed": 0},
                      sort_keys=True)  # fmt: skip  (the key before the field existed)
    assert ALIGN.precision == "bf16"
    assert run_key(config, MODEL, "dpo", ALIGN, 0) == hashlib.sha256(blob.encode()).hexdigest()[:16]
    assert run_key(config, MODEL, "dpo", replace(ALIGN, precision="fp32"), 0) != run_key(config, MODEL, "dpo", ALIGN, 0)
    with pytest.raises(ValueError, match="precision must be one of"):
        align_model(None, None, World(WorldConfig()), "dpo", replace(ALIGN, precision="fp16"), 0)
