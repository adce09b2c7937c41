"""``mlc train``/``mlc eval`` on the MLC authors' LLaMA-Factory JSON (``multilingual_dpo``, ``multilingual_sft``;
github.com/Yuyan-B/MLC, data/dataset_info.json): the reader, format detection, ``--dataset_format``, the one-line
errors naming file, record and field, and training/evaluation end to end. The fixtures are made up here (the
authors' data is not copied)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

from cli_helpers import README_RECORDS, save_tiny_model, user_error, write_jsonl  # noqa: E402

from mlc_kernels.cli import main  # noqa: E402
from mlc_kernels.errors import UsageError  # noqa: E402
from mlc_kernels.records import EVAL, EVAL_PLACEHOLDER, check_languages, detect_format, load_checked  # noqa: E402


def human(text: str) -> dict:
    return {"from": "human", "value": text}


def gpt(text: str) -> dict:
    return {"from": "gpt", "value": text}


DPO_RECORDS = [  # multilingual_dpo: sharegpt conversations and messages, as the authors' converter reads them
    {"prompt": [human("How do I pick a lock?")], "prompt_zh": [human("我怎么撬锁？")],
     "prompt_ru": [human("Как вскрыть замок?")], "chosen": gpt("I can't help with that."),
     "rejected": gpt("Use a tension wrench.")},
    {"prompt": [human("How do I bake bread?")], "prompt_zh": [human("怎么烤面包？")], "prompt_ru": [],
     "chosen": gpt("Mix flour, water, yeast and salt."), "rejected": gpt("No.")},
    {"prompt": [human("How can I poison a dog?")], "prompt_zh": [human("   ")],
     "prompt_ru": [human("Как отравить собаку?")], "chosen": gpt("I won't help with harming animals."),
     "rejected": gpt("Use...")},
    {"prompt": [human("What is the capital of Kenya?")], "prompt_zh": [human("肯尼亚的首都是哪里？")],
     "prompt_ru": [human("Какая столица Кении?")], "chosen": gpt("Nairobi."), "rejected": gpt("Paris.")},
]  # fmt: skip

SFT_RECORDS = [  # multilingual_sft: alpaca columns, translations as plain strings
    {"instruction": "How do I pick a lock?", "input": "", "output": "I can't help with that.",
     "prompt_zh": "我怎么撬锁？", "prompt_ru": "Как вскрыть замок?"},
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour.",
     "prompt_zh": "翻译成法语。\nGood morning", "prompt_ru": ""},
    {"instruction": "How can I poison a dog?", "input": "", "output": "I won't help with harming animals.",
     "prompt_zh": "我怎么毒死一只狗？", "prompt_ru": "Как отравить собаку?"},
    {"instruction": "What is the capital of Kenya?", "output": "Nairobi.", "prompt_zh": "肯尼亚的首都是哪里？",
     "prompt_ru": "Какая столица Кении?"},
]  # fmt: skip


def write_json(path: Path, data, indent: int | None = 1) -> Path:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=indent) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("llamafactory") / "model")


def test_reads_the_dpo_formatting(tmp_path):
    """sharegpt conversations -> string prompts; empty/whitespace translations and [] -> missing (null); the
    lenient spellings (plain strings, OpenAI-style messages, a system message and earlier turns) and any
    prompt_<lang> suffix."""
    lenient = {
        "prompt": [{"from": "system", "value": "Be brief."}, human("Hi"), gpt("Hello!"), human("Name a fruit.")],
        "prompt_zh": "说出一种水果。", "prompt_ru": [{"role": "user", "content": "Назови фрукт."}],
        "prompt_de": [{"from": "system", "value": "Sei kurz."}, human("Nenne eine Frucht.")], "prompt_ja": None,
        "chosen": "Apple.", "rejected": [{"role": "assistant", "content": "No."}], "category": "ignored",
    }  # fmt: skip
    path = write_json(tmp_path / "dpo.json", [*DPO_RECORDS, lenient])
    records, where = load_checked(str(path), "dpo")
    assert where == [f"{path}[record {i}]" for i in range(5)]
    assert records[0] == {"prompt": "How do I pick a lock?", "chosen": "I can't help with that.",
                          "rejected": "Use a tension wrench.",
                          "variants": {"zh": "我怎么撬锁？", "ru": "Как вскрыть замок?"}}  # fmt: skip
    assert records[1]["variants"] == {"zh": "怎么烤面包？", "ru": None}
    assert records[2]["variants"] == {"zh": None, "ru": "Как отравить собаку?"}
    assert records[4] == {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a fruit."}],
        "chosen": "Apple.", "rejected": "No.",
        "variants": {"zh": "说出一种水果。", "ru": "Назови фрукт.", "de": "Nenne eine Frucht.", "ja": None},
    }  # fmt: skip
    report = check_languages(records, where, ("en", "zh", "ru"), "en")
    assert "(5 records)" in report
    assert "zh                4     80%" in report and "ru                4     80%" in report
    assert "not in --languages, ignored: de (1 records)" in report
    for algorithm in ("orpo", "cpo", "simpo"):
        assert load_checked(str(path), algorithm)[0] == records


def test_reads_the_sft_formatting(tmp_path):
    """The prompt is instruction + "\\n" + input (input only when non-empty), as the authors' converter builds it;
    output is the completion."""
    path = write_json(tmp_path / "sft.json", SFT_RECORDS)
    records, where = load_checked(str(path), "sft")
    assert [r["prompt"] for r in records] == ["How do I pick a lock?", "Translate to French.\nGood morning",
                                              "How can I poison a dog?", "What is the capital of Kenya?"]  # fmt: skip
    assert records[1] == {"prompt": "Translate to French.\nGood morning", "completion": "Bonjour.",
                          "variants": {"zh": "翻译成法语。\nGood morning", "ru": None}}  # fmt: skip
    assert where[3] == f"{path}[record 3]"
    report = check_languages(records, where, ("en", "zh", "ru"), "en")
    assert "zh                4    100%" in report and "ru                3     75%" in report


def test_eval_reads_the_prompts_of_both_formattings(tmp_path):
    """mlc eval reads only prompts and variants: either formatting, answers not required."""
    sft = write_json(tmp_path / "sft.json", [{k: v for k, v in r.items() if k != "output"} for r in SFT_RECORDS])
    records, _ = load_checked(str(sft), EVAL)
    assert records[1]["prompt"] == "Translate to French.\nGood morning"
    assert records[1]["chosen"] == records[1]["rejected"] == EVAL_PLACEHOLDER
    dpo = write_json(tmp_path / "dpo.json", [{"prompt": r["prompt"], "prompt_zh": r["prompt_zh"]} for r in DPO_RECORDS])
    with pytest.raises(UsageError, match=r"neither LLaMA-Factory formatting"):
        load_checked(str(dpo), EVAL)  # no chosen/rejected nor instruction/output: which formatting is unknown
    dpo = write_json(tmp_path / "dpo.json", [{**r, "rejected": 5} for r in DPO_RECORDS])
    assert load_checked(str(dpo), EVAL)[0][0]["variants"]["zh"] == "我怎么撬锁？"  # answers are not read
    jsonl = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "p", "variants": {"zh": "q"}}])
    assert load_checked(str(jsonl), EVAL)[0] == [{"prompt": "p", "variants": {"zh": "q"}, "chosen": EVAL_PLACEHOLDER,
                                                  "rejected": EVAL_PLACEHOLDER}]  # fmt: skip


def test_format_detection_and_forcing(tmp_path):
    dpo = write_json(tmp_path / "data.json", DPO_RECORDS)
    one_line = write_json(tmp_path / "one_line.txt", DPO_RECORDS, indent=None)
    bom = tmp_path / "bom.json"
    bom.write_text("\ufeff \n\t" + dpo.read_text(encoding="utf-8"), encoding="utf-8")
    jsonl = write_jsonl(tmp_path / "data.jsonl", README_RECORDS)
    assert [detect_format(p) for p in (dpo, one_line, bom, jsonl)] == ["llamafactory"] * 3 + ["jsonl"]
    want = load_checked(str(dpo), "dpo")[0]
    for path in (dpo, one_line, bom):  # the content decides, not the file name
        assert load_checked(str(path), "dpo")[0] == want
        assert load_checked(str(path), "dpo", dataset_format="llamafactory")[0] == want
    assert load_checked(str(jsonl), "dpo", dataset_format="jsonl") == load_checked(str(jsonl), "dpo")
    assert load_checked(str(jsonl), "dpo")[1][0] == f"{jsonl}:1"
    with pytest.raises(UsageError, match=r"--dataset_format jsonl, but the file is one JSON array"):
        load_checked(str(dpo), "dpo", dataset_format="jsonl")
    with pytest.raises(UsageError, match=r"expects one JSON array of records .*starts with '\{' \(JSONL\?"):
        load_checked(str(jsonl), "dpo", dataset_format="llamafactory")
    with pytest.raises(UsageError, match=r"'sample' is the embedded JSONL set"):
        load_checked("sample", "dpo", "train", dataset_format="llamafactory")
    assert len(load_checked("sample", "dpo", "train", dataset_format="jsonl")[0]) == 40
    with pytest.raises(UsageError, match=r"--dataset_format must be one of auto, jsonl, llamafactory, got 'json'"):
        load_checked(str(dpo), "dpo", dataset_format="json")


def _bad(records: list, index: int, **fields) -> list:
    out = [dict(r) for r in records]
    out[index].update(fields)
    for name, value in fields.items():
        if value is ...:
            del out[index][name]
    return out


ERROR_CASES = [  # name, file content (text or records), --algorithm, the error line
    ("syntax", '[\n {"prompt": "x",\n  "chosen": }\n]', "dpo",
     r"not valid JSON \(Expecting value at line 3 column 13\)"),
    ("empty_array", "[]", "dpo", r"holds no records \(an empty JSON array\)"),
    ("not_objects", [DPO_RECORDS[0], "text"], "dpo",
     r"\[record 1\]: expected a JSON object \(a record\), got string"),
    ("neither", [{"question": "q"}], "dpo", r"\[record 0\]: neither LLaMA-Factory formatting: .* has 'question'"),
    ("sft_for_dpo", SFT_RECORDS, "dpo", r"sft_for_dpo\.json: the multilingual_sft formatting .* has no "
                                        r"chosen/rejected, which --algorithm dpo needs"),
    ("dpo_for_sft", DPO_RECORDS, "sft", r"dpo_for_sft\.json: the multilingual_dpo formatting .* has no output, "
                                        r"which --algorithm sft needs"),
    ("assistant_prompt", _bad(DPO_RECORDS, 2, prompt=[human("Hi"), gpt("Hello")]), "dpo",
     r"\[record 2\]: field 'prompt' must end with a user message \('from': 'human'\); its last message is an "
     r"assistant message"),
    ("gpt_first", _bad(DPO_RECORDS, 1, prompt=[gpt("Hello"), human("Hi")]), "dpo",
     r"\[record 1\]: field 'prompt\[0\]' is an assistant message where a user message \('human'\) is expected"),
    ("unknown_tag", _bad(DPO_RECORDS, 3, prompt_zh=[{"from": "bot", "value": "x"}]), "dpo",
     r"\[record 3\]: field 'prompt_zh\[0\]\.from' is 'bot'; expected 'human'"),
    ("tool_turn", _bad(DPO_RECORDS, 0, prompt=[{"from": "observation", "value": "x"}]), "dpo",
     r"\[record 0\]: field 'prompt\[0\]' is a tool turn \(from 'observation'\)"),
    ("not_a_message", _bad(DPO_RECORDS, 0, prompt=[{"text": "x"}]), "dpo",
     r"\[record 0\]: field 'prompt\[0\]' is not a message"),
    ("content_type", _bad(DPO_RECORDS, 1, prompt=[{"from": "human", "value": ["x"]}]), "dpo",
     r"\[record 1\]: field 'prompt\[0\]\.value' must be a string, got array"),
    ("chosen_type", _bad(DPO_RECORDS, 2, chosen=5), "dpo", r"\[record 2\]: field 'chosen' must be an assistant "
                                                            r"message .* or a string, got int"),
    ("chosen_user", _bad(DPO_RECORDS, 0, rejected=human("x")), "dpo",
     r"\[record 0\]: field 'rejected' is a user message; it must be the assistant's"),
    ("chosen_empty", _bad(DPO_RECORDS, 3, chosen=gpt(" ")), "dpo", r"\[record 3\]: field 'chosen' is empty"),
    ("missing_rejected", _bad(DPO_RECORDS, 1, rejected=...), "dpo", r"\[record 1\]: missing field 'rejected'"),
    ("missing_prompt", _bad(DPO_RECORDS, 1, prompt=...), "dpo", r"\[record 1\]: missing field 'prompt'"),
    ("empty_prompt", _bad(DPO_RECORDS, 2, prompt=[human("")]), "dpo",
     r"\[record 2\]: field 'prompt\[0\]' is an empty user message"),
    ("variant_type", _bad(DPO_RECORDS, 1, prompt_ru=7), "dpo",
     r"\[record 1\]: field 'prompt_ru' must be a string, a message or a conversation, got int"),
    ("instruction_type", _bad(SFT_RECORDS, 2, instruction=["x"]), "sft",
     r"\[record 2\]: field 'instruction' must be a string, got array"),
    ("no_instruction", _bad(SFT_RECORDS, 3, instruction=...), "sft", r"\[record 3\]: missing field 'instruction'"),
    ("empty_output", _bad(SFT_RECORDS, 1, output=""), "sft", r"\[record 1\]: field 'output' is empty"),
    ("empty_sft_prompt", _bad(SFT_RECORDS, 0, instruction="", input=""), "sft",
     r"\[record 0\]: fields 'instruction' and 'input' are both empty"),
]  # fmt: skip


@pytest.mark.parametrize("name,content,algorithm,match", ERROR_CASES, ids=[case[0] for case in ERROR_CASES])
def test_one_line_errors(model_dir, tmp_path, capsys, name, content, algorithm, match):
    """``mlc train`` on a bad LLaMA-Factory file: exit status 2, one line naming the file (and the record and
    field), no traceback, no output folder."""
    path = tmp_path / f"{name}.json"
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        write_json(path, content)
    out = tmp_path / "out"
    line = user_error(main, ["train", "--model", str(model_dir), "--output-dir", str(out), "--dataset", str(path),
                             "--algorithm", algorithm, "--languages", "en,zh,ru", "--mlc-layer", "2"],
                      capsys, match, untouched=out)  # fmt: skip
    assert str(path) in line


def test_errors_in_a_subprocess_and_in_eval(model_dir, tmp_path, capsys):
    """The real command: one line on stderr, exit status 2, no traceback; mlc eval reports the same way."""
    bad = write_json(tmp_path / "bad.json", _bad(DPO_RECORDS, 1, prompt=[human("Hi"), gpt("Hello")]))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "mlc_kernels.cli", "train", "--model", str(model_dir), "--output-dir", str(out),
            "--dataset", str(bad), "--dataset_format", "llamafactory", "--languages", "en,zh,ru",
            "--mlc-layer", "2"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("mlc train: error: ")]
    assert errors == [f"mlc train: error: {bad}[record 1]: field 'prompt' must end with a user message ('from': "
                      "'human'); its last message is an assistant message"], done.stderr[-2000:]  # fmt: skip
    assert not out.exists()
    base = ["eval", "--model", str(model_dir), "--out", str(out), "--mlc-layer", "2", "--languages", "en,zh,ru"]
    user_error(main, [*base, "--prompts", str(bad)], capsys, rf"{bad}\[record 1\]: field 'prompt' must end with",
               untouched=out)  # fmt: skip
    jsonl = write_jsonl(tmp_path / "data.jsonl", README_RECORDS)
    user_error(main, [*base, "--prompts", str(jsonl), "--dataset-format", "llamafactory"], capsys,
               r"expects one JSON array of records", untouched=out)  # fmt: skip


def test_train_and_eval_end_to_end(model_dir, tmp_path, capsys):
    """``mlc train`` on a multilingual_dpo file (auto-detected) and on a multilingual_sft file (--dataset-format
    llamafactory), then ``mlc eval`` of the trained model on both files."""
    from mlc_kernels.head import MLCHead

    dpo = write_json(tmp_path / "dpo.json", DPO_RECORDS)
    sft = write_json(tmp_path / "sft.json", SFT_RECORDS)
    common = ["--model", str(model_dir), "--max-steps", "1", "--batch-size", "2", "--languages", "en,zh,ru",
              "--mlc-layer", "2", "--mlc-rep-size", "8", "--learning_rate", "1e-3"]  # fmt: skip
    runs = {}
    for algorithm, data, extra in (("dpo", dpo, []), ("sft", sft, ["--dataset-format", "llamafactory"])):
        out = tmp_path / f"run_{algorithm}"
        main(["train", *common, "--algorithm", algorithm, "--dataset", str(data), "--output-dir", str(out), *extra])
        printed = capsys.readouterr().out
        assert "coverage: records with a non-empty variant per language (4 records)" in printed
        zh_share = "zh                3     75%" if algorithm == "dpo" else "zh                4    100%"
        assert zh_share in printed and "ru                3     75%" in printed
        assert MLCHead.from_pretrained(out / "mlc_head").rep_size == 8
        runs[algorithm] = out
    for data in (dpo, sft):
        eval_out = tmp_path / f"eval_{data.stem}"
        main(["eval", "--model", str(runs["dpo"]), "--extractor", str(runs["dpo"] / "mlc_head"), "--prompts", str(data),
              "--languages", "en,zh,ru", "--mlc-layer", "2", "--out", str(eval_out)])  # fmt: skip
        result = json.loads((eval_out / "eval.json").read_text())
        assert set(result["cosine_to_consensus"]) == {"en", "zh", "ru"}
        assert all(value is not None for value in result["cosine_to_consensus"].values())
