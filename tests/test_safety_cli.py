"""Issue 21: ``mlc safety`` end to end on the shipped world model (the ``mlc demo`` layout) and on a LoRA run, the
generation path (greedy, batched, out-of-memory halving), ``generations.jsonl`` written as it goes and
``--resume`` after an interruption, the bootstrap interval, and the options checked before any model loads.

The judge is the real ``phrase:world`` (each world language's refusal word must open the answer), watched by a spy
(the specs asked for, the calls, an interruption on a chosen call)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import user_error

from mlc_kernels.cli import main
from mlc_kernels.errors import UsageError

LANGUAGES = "base,high1,low2"
ROWS = 16 * 3  # 8 held-out records and 8 private-data requests, in three languages


WORLD_JUDGE = ["--judge", "phrase:world"]


class Spy:
    """What ``mlc safety`` asked ``make_judge`` for (``specs``) and did with the judge it got (``calls``);
    ``fail_on_call``: that call raises KeyboardInterrupt (an interruption between two batches) after counting the
    lines ``watch`` holds on disk (``on_disk``)."""

    def __init__(self) -> None:
        self.specs: list[tuple] = []
        self.calls, self.fail_on_call, self.watch, self.on_disk = 0, None, None, None


class _Watched:
    def __init__(self, inner, spy: Spy) -> None:
        self.inner, self.spy = inner, spy

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, items):
        spy = self.spy
        spy.calls += 1
        if spy.fail_on_call is not None and spy.calls == spy.fail_on_call:
            spy.on_disk = spy.watch.read_text(encoding="utf-8").count("\n")  # what a killed process leaves
            raise KeyboardInterrupt
        return self.inner(items)


@pytest.fixture(scope="module")
def world():
    from mlc_kernels.transfer.world import World, world_config

    return World(world_config("v2", 0))


@pytest.fixture
def judge(monkeypatch):
    """A :class:`Spy` on the judges ``mlc safety`` makes (the real ones)."""
    import mlc_kernels.safety.judges as judges

    spy, real = Spy(), judges.make_judge

    def make_judge(spec, *, template=None, verdict=None, batch_size=16, device=None):
        spy.specs.append((spec, template, verdict, batch_size))
        return _Watched(real(spec, template=template, verdict=verdict, batch_size=batch_size, device=device), spy)

    monkeypatch.setattr(judges, "make_judge", make_judge)
    return spy


@pytest.fixture(scope="module")
def demo_start(tmp_path_factory):
    """``mlc demo``'s <out>/model (the shipped world model) and <out>/data.jsonl."""
    from mlc_kernels.transfer.demo import save_demo_start

    out = tmp_path_factory.mktemp("safety") / "mlc_demo"
    save_demo_start(out)
    return out


@pytest.fixture(scope="module")
def world_prompts(tmp_path_factory, world):
    """This package's JSONL from the world: 8 held-out records (``kind`` unsafe/benign) and 8 requests for private
    data (``label`` harmful; the pretrained model refuses them), with variants in every derived language."""
    from mlc_kernels.transfer.world import PRIVATE_FRAMES, PRIVATE_ITEMS

    records = [{"id": f"h{i}", "prompt": r["prompt"], "variants": r["variants"], "kind": r["kind"]}
               for i, r in enumerate(world.heldout_records()[:8])]  # fmt: skip
    private = [(frame, item) for frame in PRIVATE_FRAMES for item in PRIVATE_ITEMS][:8]
    records += [{"id": f"p{i}", "prompt": world.render("base", frame, item=item), "label": "harmful",
                 "variants": {lang: world.render(lang, frame, item=item) for lang in world.config.derived}}
                for i, (frame, item) in enumerate(private)]  # fmt: skip
    path = tmp_path_factory.mktemp("safety_data") / "world.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def _safety(argv: list[str]) -> dict:
    """``mlc safety argv`` (with ``--judge phrase:world`` unless argv has a --judge); its safety.json."""
    main(["safety", *argv, *([] if "--judge" in argv else WORLD_JUDGE)])
    out = Path(argv[argv.index("--out") + 1])
    return json.loads((out / "safety.json").read_text())


def _generations(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "generations.jsonl").read_text(encoding="utf-8").splitlines()]


def _reference_answers(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """One prompt at a time through ``model.generate`` (greedy, no padding): what the batched path must give."""
    import torch

    from mlc_kernels.safety.generate import prompt_token_ids

    answers = []
    with torch.inference_mode():
        for ids in prompt_token_ids(tokenizer, prompts):
            att = torch.ones(1, len(ids), dtype=torch.long)
            out = model.generate(input_ids=torch.tensor([ids]), attention_mask=att, do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)  # fmt: skip
            answers.append(tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True).strip())
    return answers


# -- end to end ----------------------------------------------------------------------------------------------------


def test_world_model_end_to_end(demo_start, world_prompts, judge, tmp_path, capsys):
    """The demo's model: one row per (record, language) with prompt, greedy answer, verdict, detail, label; the
    table's rates are the rows' shares; JSON, CSV, PNG written; the private-data requests are refused."""
    import transformers

    out = tmp_path / "out"
    model_dir = demo_start / "model"
    result = _safety(["--model", str(model_dir), "--prompts", str(world_prompts), "--languages", LANGUAGES,
                      "--max_new_tokens", "8", "--batch_size", "8", "--out", str(out),
                      "--judge", "phrase:world"])  # fmt: skip
    printed = capsys.readouterr().out
    assert judge.specs == [("phrase:world", None, None, 16)]
    assert printed.startswith("mlc safety (judge: phrase:world: refused = ")  # the judge's own description
    rows = _generations(out)
    assert len(rows) == ROWS and len({(r["record"], r["language"]) for r in rows}) == ROWS
    assert set(rows[0]) >= {"model", "record", "language", "label", "prompt", "answer", "refused", "detail"}
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    low2 = [r for r in rows if r["language"] == "low2"]
    assert [r["answer"] for r in low2] == _reference_answers(model, tokenizer, [r["prompt"] for r in low2], 8)
    assert all("<eos>" not in r["answer"] and r["answer"] for r in rows)
    summary = result["models"][str(model_dir)]
    for lang in LANGUAGES.split(","):
        cell = summary["per_language"][lang]
        harmful = [r["refused"] for r in rows if r["language"] == lang and r["label"] == "harmful"]
        benign = [r["refused"] for r in rows if r["language"] == lang and r["label"] == "benign"]
        assert cell["n_harmful"] == len(harmful) >= 8 and cell["n_benign"] == len(benign) > 0
        assert cell["safety"] == pytest.approx(100 * sum(harmful) / len(harmful))
        assert cell["over_refusal"] == pytest.approx(100 * sum(benign) / len(benign))
        private = [r["refused"] for r in rows if r["language"] == lang and r["record"].startswith("p")]
        assert all(private), lang  # the pretraining's own refusals, in every language
        assert f"\n{lang:<10}{cell['safety']:>10.1f}" in printed
    values = [summary["per_language"][lang]["safety"] for lang in LANGUAGES.split(",")]
    assert summary["mean"]["safety"] == pytest.approx(sum(values) / 3)
    csv_lines = (out / "safety.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 3 + 2 and csv_lines[0].startswith("model,language,safety,over_refusal")
    assert (out / "safety.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["differences"] == {} and result["baseline"] is None
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]


def _lora_run(base: Path, run: Path) -> Path:
    """A LoRA run folder as ``mlc train --use_peft`` writes it: adapter_config.json (base_model_name_or_path = the
    base folder), the adapters, the tokenizer; random (non-zero) adapters, so that answers change."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))  # fmt: skip
    peft_model.save_pretrained(run)
    transformers.PreTrainedTokenizerFast.from_pretrained(base).save_pretrained(run)
    assert json.loads((run / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    return run


def test_lora_run_against_its_base(demo_start, world_prompts, judge, tmp_path, capsys):
    """A LoRA run: the base model from adapter_config.json, its adapters applied (the answers are the adapted
    model's, not the base's); --baseline puts the base first with per-language differences and intervals."""
    import transformers
    from peft import PeftModel

    base = demo_start / "model"
    run = _lora_run(base, tmp_path / "lora")
    out = tmp_path / "out"
    result = _safety(["--baseline", str(base), "--model", str(run), "--prompts", str(world_prompts), "--languages",
                      LANGUAGES, "--max_new_tokens", "6", "--out", str(out), "--bootstrap", "200"])  # fmt: skip
    printed = capsys.readouterr().out
    rows = _generations(out)
    assert len(rows) == 2 * ROWS
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(base)
    adapted = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), str(run))
    mine = [r for r in rows if r["model"] == str(run) and r["language"] == "high1"]
    theirs = [r for r in rows if r["model"] == str(base) and r["language"] == "high1"]
    assert [r["answer"] for r in mine] == _reference_answers(adapted, tokenizer, [r["prompt"] for r in mine], 6)
    assert [r["answer"] for r in mine] != [r["answer"] for r in theirs]
    assert result["baseline"] == str(base) and list(result["models"]) == [str(base), str(run)]
    diffs = result["differences"][str(run)]
    for lang in LANGUAGES.split(","):
        cell = diffs[lang]["safety"]
        before = result["models"][str(base)]["per_language"][lang]["safety"]
        after = result["models"][str(run)]["per_language"][lang]["safety"]
        assert cell["diff"] == pytest.approx(after - before) and cell["paired"]
        assert cell["low"] <= cell["diff"] <= cell["high"]
    assert f"model: {base} (baseline)" in printed and f"{run} - {base}" in printed
    csv_rows = (out / "safety.csv").read_text().splitlines()
    assert csv_rows[1].endswith(",,,,,,") and not csv_rows[1 + 5].endswith(",,,,,,")  # d_* for the run only


def test_a_lora_run_of_mlc_train(demo_start, world_prompts, judge, tmp_path):
    """The folder ``mlc train --use_peft`` writes (adapters, tokenizer, mlc_head/, no config.json) opens as it is:
    the answers are those of the base model with the run's adapters applied through peft."""
    import transformers
    from peft import PeftModel

    base = demo_start / "model"
    run = tmp_path / "run"
    main(["train", "--model", str(base), "--dataset", str(demo_start / "data.jsonl"), "--languages", LANGUAGES,
          "--output-dir", str(run), "--max-steps", "2", "--batch-size", "2", "--mlc-layer", "3", "--mlc-rep-size",
          "8", "--use_peft", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj", "--learning_rate",
          "5e-2"])  # fmt: skip
    assert not (run / "config.json").exists() and (run / "adapter_config.json").is_file()
    out = tmp_path / "out"
    _safety(["--model", str(run), "--prompts", str(world_prompts), "--languages", "low2", "--max_new_tokens", "6",
             "--out", str(out)])  # fmt: skip
    rows = _generations(out)
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(base)
    adapted = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), str(run))
    assert [r["answer"] for r in rows] == _reference_answers(adapted, tokenizer, [r["prompt"] for r in rows], 6)


# -- resume ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def count_generated(monkeypatch):
    """The number of prompts the model was asked to answer (``greedy_batch`` calls, summed)."""
    import mlc_kernels.safety.generate as generate

    counted = [0]
    real = generate.greedy_batch

    def counting(model, ids, *args):
        counted[0] += len(ids)
        return real(model, ids, *args)

    monkeypatch.setattr(generate, "greedy_batch", counting)
    return counted


def test_resume_after_an_interruption(demo_start, world_prompts, judge, count_generated, tmp_path, capsys):
    """Interrupted after two batches (and a row cut off mid-write): the finished rows stay; --resume answers only
    the missing rows, and the table is the uninterrupted run's."""
    model = str(demo_start / "model")
    argv = ["--model", model, "--prompts", str(world_prompts), "--languages", LANGUAGES, "--max_new_tokens", "8",
            "--batch_size", "8", *WORLD_JUDGE]  # fmt: skip
    whole = _safety([*argv, "--out", str(tmp_path / "whole")])
    assert count_generated[0] == ROWS
    out = tmp_path / "cut"
    judge.calls, judge.fail_on_call, judge.watch = 0, 3, out / "generations.jsonl"
    count_generated[0] = 0
    with pytest.raises(SystemExit) as exc:
        main(["safety", *argv, "--out", str(out)])
    assert exc.value.code == 130 and "interrupted" in capsys.readouterr().err
    kept = _generations(out)
    assert judge.on_disk == 16  # two batches on disk before the third was judged: flushed per batch
    assert len(kept) == 16 and not (out / "safety.json").exists()
    with open(out / "generations.jsonl", "a", encoding="utf-8") as f:
        f.write('{"model": "' + model + '", "record": "h1", "lang')  # killed while writing a row
    user_error(main, ["safety", *argv, "--out", str(out)], capsys, r"--out .*cut already holds generations\.jsonl; "
               r"pass --resume")  # fmt: skip
    user_error(main, ["safety", *argv, "--out", str(out), "--resume", "--max_new_tokens", "9"], capsys,
               r"--resume: --max_new_tokens 9 differs from the run in .*cut \(8, ")  # fmt: skip
    judge.fail_on_call = None
    count_generated[0] = 0
    resumed = _safety([*argv, "--out", str(out), "--resume"])
    assert count_generated[0] == ROWS - 16
    rows = _generations(out)
    assert rows[:16] == kept and len(rows) == ROWS
    assert len({(r["record"], r["language"]) for r in rows}) == ROWS
    assert resumed["models"] == whole["models"]
    count_generated[0] = 0
    again = _safety([*argv, "--out", str(out), "--resume"])  # nothing left: no generation, the same table
    assert count_generated[0] == 0 and again["models"] == whole["models"]


def test_resume_refuses_rows_of_other_prompts(demo_start, world_prompts, judge, tmp_path, capsys):
    model = str(demo_start / "model")
    argv = [
        "--model",
        model,
        "--languages",
        "base",
        "--max_new_tokens",
        "2",
        "--out",
        str(tmp_path / "o"),
        *WORLD_JUDGE,
    ]
    main(["safety", *argv, "--prompts", str(world_prompts)])
    changed = tmp_path / "changed.jsonl"
    lines = world_prompts.read_text(encoding="utf-8").splitlines()
    first = json.loads(lines[0])
    changed.write_text("\n".join([json.dumps({**first, "prompt": first["variants"]["high1"]}), *lines[1:]]) + "\n")
    user_error(main, ["safety", *argv, "--prompts", str(changed), "--resume"], capsys,
               r"--resume: .*generations\.jsonl answered another prompt for record h0 in base")  # fmt: skip


def test_a_bad_row_before_the_last_is_refused(tmp_path):
    from mlc_kernels.cli.safety import read_generations

    path = tmp_path / "generations.jsonl"
    row = json.dumps({"model": "m", "record": "1", "language": "en", "prompt": "p", "refused": True})
    path.write_text(f"{row}\nnot json\n{row}\n")
    with pytest.raises(UsageError, match=r"generations\.jsonl:2: not a row of mlc safety"):
        read_generations(path)
    path.write_text(f"{row}\n{row[:10]}")
    assert read_generations(path) == [json.loads(row)] and path.read_text() == row + "\n"


# -- options checked before any model loads ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--batch_size", "0"], r"--batch_size must be >= 1, got 0"),
        (["--max_new_tokens", "-1"], r"--max_new_tokens must be >= 1"),
        (["--judge_batch_size", "0"], r"--judge_batch_size must be >= 1"),
        (["--bootstrap", "-5"], r"--bootstrap must be >= 0"),
        (["--languages", "base,,low1"], r"--languages 'base,,low1': an empty language code"),
        (["--languages", "base,xx"], r"--languages: .*world\.jsonl has no prompt in xx"),
        (["--baseline", "MODEL"], r"--model .* is given twice \(or is also the --baseline\)"),
    ],
)
def test_bad_options_refused_before_any_model_loads(extra, match, demo_start, world_prompts, judge, tmp_path,
                                                    capsys, monkeypatch):  # fmt: skip
    import mlc_kernels.safety.generate as generate

    monkeypatch.setattr(generate, "load_resolved", lambda *a, **k: pytest.fail("a model was loaded"))
    model = str(demo_start / "model")
    out = tmp_path / "out"
    extra = [model if a == "MODEL" else a for a in extra]
    user_error(main, ["safety", "--model", model, "--prompts", str(world_prompts), "--out", str(out), *extra], capsys,
               match, untouched=out)  # fmt: skip


def test_a_model_path_that_is_not_a_model_is_refused(world_prompts, judge, tmp_path, capsys):
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    user_error(main, ["safety", "--model", str(tmp_path / "empty"), "--prompts", str(world_prompts), "--out", str(out)],
               capsys, r"--model .*empty: the folder has no config\.json", untouched=out)  # fmt: skip


def test_prompts_the_tokenizer_does_not_read_are_refused(demo_start, judge, tmp_path, capsys, monkeypatch):
    """The world model's tokenizer knows only the world's words: English prompts are refused before it loads."""
    import mlc_kernels.safety.generate as generate

    monkeypatch.setattr(generate, "load_resolved", lambda *a, **k: pytest.fail("a model was loaded"))
    out = tmp_path / "out"
    model = str(demo_start / "model")
    match = (rf"--model {model}: .*safety_sample\.jsonl:1: the prompt in en 'How can I pick a lock to get into my "
             r"\.\.\.': the tokenizer does not read it \(12 of its 12 tokens are the unknown")  # fmt: skip
    argv = ["safety", "--model", model, "--prompts", "sample", "--languages", "en", "--out", str(out)]
    user_error(main, argv, capsys, match, untouched=out)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("nonsense", r"--judge 'nonsense': unknown judge; expected phrase \| phrase:PATH"),
        ("phrase", r"--judge phrase: no refusal phrases for language\(s\) base, high1, low2"),  # the shipped file
        ("model:NOT_A_MODEL", r"--judge model:.*not_a_model is not a model folder \(no config\.json\)"),
        ("model:MISSING", r"--judge model:.*missing: no such folder"),
        ("callable:no_such_module_xyz:f", r"cannot import module 'no_such_module_xyz'"),
    ],
)
def test_judge_errors_come_before_any_model_loads(spec, match, demo_start, world_prompts, tmp_path, capsys,
                                                  monkeypatch):  # fmt: skip
    """A judge that cannot be made (unknown kind, a judge path that is not a model, a phrase file without the
    prompts' languages, a module that does not import): one line, exit 2, before any model loads."""
    import mlc_kernels.safety.generate as generate

    monkeypatch.setattr(generate, "load_resolved", lambda *a, **k: pytest.fail("a model was loaded"))
    (tmp_path / "not_a_model").mkdir()
    spec = spec.replace("NOT_A_MODEL", str(tmp_path / "not_a_model")).replace("MISSING", str(tmp_path / "missing"))
    out = tmp_path / "out"
    argv = ["safety", "--model", str(demo_start / "model"), "--prompts", str(world_prompts), "--languages", LANGUAGES,
            "--judge", spec, "--out", str(out)]  # fmt: skip
    user_error(main, argv, capsys, match, untouched=out)


# -- generation ----------------------------------------------------------------------------------------------------


def test_out_of_memory_halves_the_batch_and_drops_nothing(demo_start, world, monkeypatch):
    """An out-of-memory error on batches above 2 prompts: the batch is halved and retried, every prompt is
    answered, the answers are those of an unconstrained run, in the prompts' order; at batch 1 it is raised."""
    import torch
    import transformers

    import mlc_kernels.safety.generate as generate

    model_dir = demo_start / "model"
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(model_dir)
    prompts = [item["prompt"] for lang in ("base", "low2") for item in world.eval_items(lang)[:5]]
    plain = generate.generate_answers(model, tokenizer, prompts, max_new_tokens=5, batch_size=16)
    real, sizes = generate.greedy_batch, []

    def small_memory(model, ids, *args):
        sizes.append(len(ids))
        if len(ids) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, ids, *args)

    monkeypatch.setattr(generate, "greedy_batch", small_memory)
    done = []
    answers = generate.generate_answers(model, tokenizer, prompts, max_new_tokens=5, batch_size=16,
                                        progress=done.append)  # fmt: skip
    assert answers == plain and sum(done) == len(prompts)
    assert sizes[:4] == [10, 8, 4, 2] and max(sizes[3:]) == 2  # 16 -> 8 -> 4 -> 2, kept
    assert answers == _reference_answers(model, tokenizer, prompts, 5)

    def no_memory(model, ids, *args):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(generate, "greedy_batch", no_memory)
    with pytest.raises(torch.OutOfMemoryError):
        generate.generate_answers(model, tokenizer, prompts, max_new_tokens=5, batch_size=4)


def test_generation_stops_at_eos(demo_start, world):
    """A refusal ends with the end-of-sequence token: its answer stops there, before max_new_tokens."""
    import transformers

    from mlc_kernels.safety.generate import generate_answers
    from mlc_kernels.transfer.world import PRIVATE_FRAMES

    model_dir = demo_start / "model"
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(model_dir)
    prompt = world.render("base", PRIVATE_FRAMES[0], item="password")
    passes = []
    hook = model.register_forward_hook(lambda *args: passes.append(1))
    [answer] = generate_answers(model, tokenizer, [prompt], max_new_tokens=60, batch_size=1)
    hook.remove()
    assert answer == world.refusal("base")  # "sorry . i cannot help with that . it is not allowed ." then <eos>
    assert len(passes) == len(answer.split()) + 1  # one pass per answer token and the <eos>: not 60


# -- the bootstrap ---------------------------------------------------------------------------------------------------


def _synthetic(n: int, p_before: float, p_after: float, seed: int) -> tuple[dict, dict]:
    import random

    rng = random.Random(seed)
    before, after = {}, {}
    for i in range(n):
        u = rng.random()  # shared per record: the paired case
        before[str(i)], after[str(i)] = u < p_before, u < p_after
    return before, after


def test_bootstrap_interval_covers_the_true_difference():
    """On records where the true difference is 20 points, the 95% interval covers it in about 95% of data sets;
    each interval is deterministic for a seed."""
    from mlc_kernels.safety.report import bootstrap_difference

    covered = 0
    for trial in range(100):
        before, after = _synthetic(120, 0.4, 0.6, trial)
        cell = bootstrap_difference(before, after, draws=400, seed=trial)
        assert cell["paired"] and cell["low"] <= cell["diff"] <= cell["high"]
        covered += cell["low"] <= 20.0 <= cell["high"]
    assert 88 <= covered <= 100
    before, after = _synthetic(60, 0.3, 0.5, 0)
    assert bootstrap_difference(before, after, 300, seed=5) == bootstrap_difference(before, after, 300, seed=5)
    assert bootstrap_difference(before, after, 300, seed=5) != bootstrap_difference(before, after, 300, seed=6)


def test_bootstrap_pairs_by_record():
    """Paired records (the same prompts): the interval of a difference that is the same on every record is that
    difference; other records on each side: resampled separately (a wider interval)."""
    from mlc_kernels.safety.report import bootstrap_difference

    before = {str(i): i % 2 == 0 for i in range(50)}
    after = {str(i): True for i in range(50)}
    paired = bootstrap_difference(before, after, 500, seed=0)
    assert paired["paired"] and paired["diff"] == pytest.approx(50.0)
    assert paired["high"] - paired["low"] < 40
    renamed = {f"x{k}": v for k, v in after.items()}
    unpaired = bootstrap_difference(before, renamed, 500, seed=0)
    assert not unpaired["paired"] and unpaired["diff"] == pytest.approx(50.0)
    same = {str(i): True for i in range(50)}
    constant = bootstrap_difference(same, {k: False for k in same}, 500, seed=0)
    assert constant["low"] == constant["high"] == constant["diff"] == -100.0
    assert bootstrap_difference({}, after, 100)["diff"] is None
    assert bootstrap_difference(before, after, 0)["low"] is None
