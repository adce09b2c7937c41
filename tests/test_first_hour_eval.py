"""Issue 20 (a new user's first hour), the ``mlc eval`` side and the data it reads: the tokenizer must read the
data (finding 1), LoRA runs (2), the extractor's saved settings (3), eval's own options, output folder and figure
(4, 7, 8)."""

from __future__ import annotations

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
