"""Issue 20 (a new user's first hour), the ``mlc eval`` side and the data it reads: the tokenizer must read the
data (finding 1), LoRA runs (2), the extractor's saved settings (3), eval's own options, output folder and figure
(4, 7, 8)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("trl")

from cli_helpers import README_RECORDS, user_error, write_jsonl  # noqa: E402

from mlc_kernels.cli import main  # noqa: E402

WORLD_LANGUAGES = "base,high1,high2,low1,low2"


@pytest.fixture(scope="module")
def demo_start(tmp_path_factory):
    """What ``mlc demo --out <out>`` writes first: <out>/model (the shipped world model) and <out>/data.jsonl."""
    from mlc_kernels.transfer.demo import save_demo_start

    out = tmp_path_factory.mktemp("first_hour") / "mlc_demo"
    save_demo_start(out)
    return out


# -- finding 1: the tokenizer reads the data ---------------------------------------------------------------------


def test_demo_writes_data_its_model_reads(demo_start):
    """<out>/data.jsonl: this package's JSONL in the world's five languages (DPO and SFT fields), every prompt and
    variant read by the world's tokenizer (no unknown token)."""
    import transformers

    from mlc_kernels.mlc_term import check_tokenisation
    from mlc_kernels.records import check_languages, load_checked
    from mlc_kernels.trainers import MLCArguments

    data = demo_start / "data.jsonl"
    for algorithm in ("dpo", "sft"):
        records, where = load_checked(str(data), algorithm)
    assert len(records) == 64 and where[0] == f"{data}:1"
    languages = tuple(WORLD_LANGUAGES.split(","))
    assert "(64 records)" in check_languages(records, where, languages, "base")
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(demo_start / "model")
    check_tokenisation(records, where, tokenizer, MLCArguments(languages=languages, base_language="base"))
    ids = tokenizer(records[0]["variants"]["low2"], add_special_tokens=False)["input_ids"]
    assert ids and tokenizer.unk_token_id not in ids


def test_mostly_unknown_or_empty_tokenisations_are_refused():
    """A variant whose content tokens are more than half the unknown token, or that adds no content token, is
    refused naming the record and the language; one unknown word among known ones is accepted."""
    from mlc_kernels.mlc_term import TokenisationError, check_tokenisation
    from mlc_kernels.trainers import MLCArguments
    from mlc_kernels.transfer.world import World, world_config, world_tokenizer

    world = World(world_config("v2", 0))
    tokenizer = world_tokenizer(world)
    record = world.alignment_records()[0]
    mlc = MLCArguments(languages=("base", "low1"), base_language="base")
    words = record["variants"]["low1"].split()
    check_tokenisation([record], ["d.jsonl:1"], tokenizer, mlc)
    one_unknown = {**record, "variants": {"low1": " ".join([*words, "Xyzzy"])}}
    check_tokenisation([one_unknown], ["d.jsonl:1"], tokenizer, mlc)
    mostly = {**record, "variants": {"low1": " ".join([words[0], "Foo", "Bar"])}}
    with pytest.raises(TokenisationError, match=r"^d\.jsonl:7: variants\.low1 \(language low1\) .*2 of its 3 tokens "
                                                r"are the unknown token"):  # fmt: skip
        check_tokenisation([mostly], ["d.jsonl:7"], tokenizer, mlc)
    special = {**record, "prompt": "<|assistant|>"}
    with pytest.raises(TokenisationError, match=r"d\.jsonl:2: prompt \(language base\) .*adds no content token"):
        check_tokenisation([special], ["d.jsonl:2"], tokenizer, mlc)


@pytest.mark.parametrize("command", ["train", "eval"])
def test_data_the_model_does_not_read_is_refused(command, demo_start, tmp_path, capsys):
    """README's English/Chinese/Russian records on the demo model (a word-level tokenizer of the world's
    languages): one line naming the record and the language, exit 2, nothing written (was: training on nothing,
    cosines 1.0000 everywhere, rc 0)."""
    data = write_jsonl(tmp_path / "data.jsonl", README_RECORDS)
    out = tmp_path / "out"
    common = ["--model", str(demo_start / "model"), "--languages", "en,zh,ru", "--mlc-layer", "2"]
    if command == "train":
        argv = ["train", *common, "--dataset", str(data), "--output-dir", str(out), "--max-steps", "1"]
        where = r"(data\.jsonl:1|record 0)"  # file:line once mlc train checks before building the trainer
    else:
        argv = ["eval", *common, "--prompts", str(data), "--out", str(out)]
        where = r"data\.jsonl:1"
    user_error(main, argv, capsys, where + r": prompt \(language en\) 'How do I pick a lock\?': the tokenizer does "
               r"not read it", untouched=out)  # fmt: skip


# -- findings 2 and 3: LoRA runs; the extractor remembers its settings ----------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from cli_helpers import save_tiny_model

    root = tmp_path_factory.mktemp("first_hour_tiny")
    return save_tiny_model(root / "model"), write_jsonl(root / "data.jsonl", README_RECORDS)


@pytest.fixture(scope="module")
def full_run(tiny, tmp_path_factory):
    """A one-step mlc train run at layer 2 with a non-default objective and tau, in en,zh,ru."""
    model, data = tiny
    out = tmp_path_factory.mktemp("first_hour_run") / "run"
    main(["train", "--model", str(model), "--dataset", str(data), "--output-dir", str(out), "--max-steps", "1",
          "--batch-size", "2", "--algorithm", "dpo", "--languages", "en,zh,ru", "--mlc-layer", "2",
          "--mlc-rep-size", "8", "--mlc_objective", "sv_softmax", "--mlc_tau", "0.5"])  # fmt: skip
    return out


def _eval(argv: list[str], out: Path) -> dict:
    main(["eval", *argv, "--out", str(out)])
    return json.loads((out / "eval.json").read_text())


def test_the_extractor_saves_its_settings(full_run):
    config = json.loads((full_run / "mlc_head" / "mlc_head_config.json").read_text())
    assert config == {"hidden_size": 64, "rep_size": 8, "bias": True, "layer": 2, "objective": "sv_softmax",
                      "tau": 0.5, "guard": None, "base_language": "en", "languages": ["en", "zh", "ru"]}  # fmt: skip


def test_eval_takes_the_saved_settings_and_the_run_s_extractor(full_run, tiny, tmp_path, capsys):
    """No --extractor, --mlc-layer or --languages: the run's mlc_head, its layer 2 and its languages apply (the
    defaults would be no extractor, 'final' and the ten sample languages)."""
    _, data = tiny
    result = _eval(["--model", str(full_run), "--prompts", str(data)], tmp_path / "e")
    assert result["extractor"] == str(full_run / "mlc_head") and result["layer"] == 2
    assert list(result["cosine_to_consensus"]) == ["en", "zh", "ru"]
    assert result["settings"]["objective"] == "sv_softmax" and result["settings"]["tau"] == 0.5
    same = _eval(["--model", str(full_run), "--prompts", str(data), "--mlc-layer", "2", "--mlc_tau", "0.5"],
                 tmp_path / "e2")  # fmt: skip
    assert same["cosine_to_consensus"] == result["cosine_to_consensus"]
    raw = _eval(["--model", str(full_run), "--prompts", str(data), "--extractor", "none"], tmp_path / "e3")
    assert raw["extractor"] is None and raw["layer"] == "final"


@pytest.mark.parametrize("option,value,match", [
    ("--mlc-layer", "3", r"--mlc_layer 3 contradicts the extractor's saved layer 2 \(.*mlc_head_config\.json\)"),
    ("--mlc_objective", "relative_sv_softmax", r"--mlc_objective relative_sv_softmax contradicts .* 'sv_softmax'"),
    ("--mlc-tau", "0.2", r"--mlc_tau 0\.2 contradicts the extractor's saved tau 0\.5"),
    ("--mlc-rep-size", "512", r"--mlc_rep_size 512 contradicts the extractor's saved rep_size 8"),
    ("--mlc_guard", "center", r"--mlc_guard center contradicts the extractor's saved guard None"),
])  # fmt: skip
def test_an_option_contradicting_the_extractor_is_refused(option, value, match, full_run, tiny, tmp_path, capsys,
                                                          monkeypatch):  # fmt: skip
    import mlc_kernels.cli.eval as evaluation

    monkeypatch.setattr(evaluation, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    _, data = tiny
    out = tmp_path / "e"
    user_error(main, ["eval", "--model", str(full_run), "--prompts", str(data), option, value, "--out", str(out)],
               capsys, match, untouched=out)  # fmt: skip


def test_an_old_extractor_without_settings_still_loads(full_run, tiny, tmp_path, capsys):
    """A head saved before the settings were: it loads, one line says the options' defaults apply."""
    import shutil

    _, data = tiny
    old = tmp_path / "old_head"
    shutil.copytree(full_run / "mlc_head", old)
    config = json.loads((old / "mlc_head_config.json").read_text())
    (old / "mlc_head_config.json").write_text(json.dumps({k: config[k] for k in ("hidden_size", "rep_size", "bias")}))
    result = _eval(["--model", str(full_run), "--extractor", str(old), "--prompts", str(data), "--languages",
                    "en,zh,ru", "--mlc-layer", "2", "--mlc-tau", "0.3"], tmp_path / "e")  # fmt: skip
    printed = capsys.readouterr().out
    notes = [line for line in printed.splitlines() if "saved without its training settings" in line]
    assert len(notes) == 1 and "layer 2" in notes[0]
    assert result["layer"] == 2 and result["extractor"] == str(old)


def test_eval_opens_a_lora_run(tiny, tmp_path, capsys):
    """mlc train --use_peft writes adapters, no config.json: mlc eval reads the base model from
    adapter_config.json, applies the adapters with peft and finds the run's extractor; the numbers are those of
    the adapted model (not of the base model)."""
    import transformers
    from peft import PeftModel

    from mlc_kernels.cli.eval import evaluate
    from mlc_kernels.head import MLCHead
    from mlc_kernels.trainers import MLCArguments

    model, data = tiny
    run = tmp_path / "lora"
    main(["train", "--model", str(model), "--dataset", str(data), "--output-dir", str(run), "--max-steps", "1",
          "--batch-size", "2", "--algorithm", "dpo", "--languages", "en,zh,ru", "--mlc-layer", "2",
          "--mlc-rep-size", "8", "--use_peft", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj",
          "--learning_rate", "5e-2"])  # fmt: skip
    assert not (run / "config.json").exists() and (run / "adapter_config.json").is_file()
    result = _eval(["--model", str(run), "--prompts", str(data)], tmp_path / "e")
    assert result["extractor"] == str(run / "mlc_head") and result["layer"] == 2
    tokenizer = transformers.AutoTokenizer.from_pretrained(model)
    head = MLCHead.from_pretrained(run / "mlc_head")
    mlc = MLCArguments(languages=("en", "zh", "ru"), layer=2)
    base = transformers.AutoModelForCausalLM.from_pretrained(model)
    plain = evaluate(base, tokenizer, README_RECORDS, mlc, head)
    adapted = evaluate(PeftModel.from_pretrained(base, str(run)), tokenizer, README_RECORDS, mlc, head)
    for lang, value in adapted["cosine_to_consensus"].items():
        assert result["cosine_to_consensus"][lang] == pytest.approx(value, abs=1e-5)
    assert result["s1_share"] == pytest.approx(adapted["s1_share"], abs=1e-6)
    assert result["s1_share"] != pytest.approx(plain["s1_share"], abs=1e-7)  # the adapters were applied


# -- the eval parts of findings 4, 7, 8 ----------------------------------------------------------------------------


def _read_only_folder(tmp_path: Path) -> Path:
    """A folder where nothing can be created: a chmod 555 folder, or (as root, who ignores modes) /sys."""
    import tempfile

    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError:
        return folder
    folder.chmod(0o755)
    if Path("/sys").is_dir() and not (Path("/sys") / "mlc_out").exists():
        return Path("/sys")
    pytest.skip("no read-only folder on this machine")


def test_read_only_out_is_refused_before_the_model_loads(tiny, tmp_path, capsys, monkeypatch):
    import mlc_kernels.cli.eval as evaluation

    monkeypatch.setattr(evaluation, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    model, data = tiny
    out = _read_only_folder(tmp_path) / "out"
    user_error(main, ["eval", "--model", str(model), "--prompts", str(data), "--out", str(out)], capsys,
               rf"^mlc eval: error: --out {out}: cannot create it here", untouched=out)  # fmt: skip


def test_eval_help_lists_no_training_only_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in ("--model", "--extractor", "--prompts", "--languages", "--mlc_layer", "--mlc_base_language",
                   "--mlc_generation_prompt", "--mlc_tau"):  # fmt: skip
        assert option in text, option
    for option in ("--mlc_weight", "--mlc_aux_every", "--mlc_impl", "--mlc_packed", "--mlc_grad_cache",
                   "--mlc_lead_steps", "--mlc_head_bias", "--mlc_head_orthogonal", "--mlc_uniform_weight",
                   "--mlc_collapse_warn_ratio", "--mlc_log_metrics", "--mlc_chunk_prompts"):  # fmt: skip
        assert option not in text, option
    flat = " ".join(text.split())
    assert "(default: the first of --languages) --" in flat  # shown once (was: "... (default: None)")
    assert "adapter_config.json) --extractor" in flat  # a required option: no "(default: None)"


def test_eval_png_has_a_title_and_labelled_axes(tiny, tmp_path, monkeypatch):
    """eval.png: a title, an x-label, a y-label saying what is measured and its range, no offset notation."""
    from matplotlib.figure import Figure

    seen = []
    savefig = Figure.savefig

    def spy(fig, *args, **kwargs):
        ax = fig.axes[0]
        fig.canvas.draw()
        seen.append((ax.get_title(), ax.get_xlabel(), ax.get_ylabel(), ax.yaxis.get_offset_text().get_text()))
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    model, data = tiny
    out = tmp_path / "e"
    _eval(["--model", str(model), "--prompts", str(data), "--languages", "en,zh,ru", "--mlc-layer", "2"], out)
    assert (out / "eval.png").stat().st_size > 1000
    (title, xlabel, ylabel, offset), = seen
    assert "mlc eval" in title and "layer 2" in title
    assert xlabel == "language of the variant prompt"
    assert "cosine" in ylabel and "dimensionless" in ylabel and offset == ""
