"""Alignment runs as tasks: one run and its evaluation, the per-run result cache, runs in parallel processes.

A run's result (``{"behaviour", "collapse", "curve"}``) is cached as ``<runs_dir>/<run_key>.json``; the key hashes
everything the result depends on (the pretrained checkpoint's key, the condition, the alignment settings, the
seed), so a run is never repeated and its result does not depend on where it ran.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import queue
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .align import AlignConfig, align_model, consistency
from .evaluation import behaviour
from .pretrain import ModelConfig, cache_key
from .world import World, WorldConfig


def collapse_stats(model, tokenizer, world: World, align: AlignConfig) -> dict:
    """Centred layer-k consistency of held-out prompts plus the collapse diagnostics the metrics offer."""
    stats = consistency(model, tokenizer, world, align)
    return {k: v for k, v in stats.items() if k != "cosine_to_consensus"}


def step_curve(log_history: list[dict]) -> list[dict]:
    """The logged training steps: ``step`` and the losses and MLC diagnostics logged there."""
    keys = ("loss", "rewards/accuracies", "mlc/loss", "mlc/between_prompt_cosine", "mlc/s1_share")
    return [{"step": e["step"], **{k: e[k] for k in keys if k in e}} for e in log_history if "loss" in e]


def run_key(world: WorldConfig, model: ModelConfig, condition: str, align: AlignConfig, seed: int) -> str:
    """Hash of everything one alignment run's result depends on (for the per-run result cache)."""
    settings = asdict(align)
    if not settings["mlc_lead_steps"]:  # added in round 2: round 1's keys stay as they were
        del settings["mlc_lead_steps"]
    if settings["mlc_aux_every"] == 1:  # added for v3: the earlier runs' keys stay as they were
        del settings["mlc_aux_every"]
    if settings["precision"] == "bf16":  # the recorded runs' numerics: their keys stay as they were
        del settings["precision"]
    blob = json.dumps({"ckpt": cache_key(world, model), "condition": condition, "align": settings, "seed": seed},
                      sort_keys=True)  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_path(runs_dir: Path | None, world: WorldConfig, model: ModelConfig, condition: str, align: AlignConfig,
             seed: int) -> Path | None:  # fmt: skip
    """Where the run cache keeps one run's result (None without a cache)."""
    return runs_dir / f"{run_key(world, model, condition, align, seed)}.json" if runs_dir is not None else None


def align_and_evaluate(model, tokenizer, world: World, model_config: ModelConfig, condition: str, align: AlignConfig,
                       seed: int, runs_dir: Path | None, callbacks: list | None = None) -> dict:  # fmt: skip
    """One alignment run (``condition`` "dpo" or "dpo+mlc") and its evaluation: ``{"behaviour", "collapse",
    "curve"}``; read from / written to ``runs_dir/<run_key>.json`` when ``runs_dir`` is set. ``callbacks``: extra
    trainer callbacks."""
    path = run_path(runs_dir, world.config, model_config, condition, align, seed)
    if path is not None and path.is_file():
        return json.loads(path.read_text())
    torch.manual_seed(seed)
    aligned, history = align_model(model, tokenizer, world, condition, align, seed, callbacks)
    result = {"behaviour": behaviour(aligned, tokenizer, world, align.eval_per_kind),
              "collapse": collapse_stats(aligned, tokenizer, world, align), "curve": step_curve(history)}  # fmt: skip
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result))
    return result


@dataclass(frozen=True)
class RunTask:
    """One alignment run for a worker process: the pretrained ``model`` and ``tokenizer`` travel with it (a few
    MB), the world is rebuilt from its config."""

    world: WorldConfig
    model_config: ModelConfig
    condition: str
    align: AlignConfig
    seed: int
    runs_dir: Path | None
    model: object = None
    tokenizer: object = None
    label: str = ""
    ticks: object = None  # a queue that gets one item per optimizer step (for a step progress bar)


def step_callback(tick):
    """A trainer callback calling ``tick()`` after every optimizer step."""
    from transformers import TrainerCallback

    class StepTick(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            tick()

    return StepTick()


def _run_task(task: RunTask, threads: int) -> dict:
    """A worker's job (module level, so that it pickles): :func:`align_and_evaluate` on ``threads`` threads (the
    trainers' collapse warning is silenced: the tables report the diagnostics)."""
    import datasets
    import transformers

    logging.getLogger("mlc_kernels.trainers").setLevel(logging.ERROR)
    torch.set_num_threads(threads)
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    warnings.simplefilter("ignore")
    callbacks = [step_callback(lambda: task.ticks.put(1))] if task.ticks is not None else None
    return align_and_evaluate(task.model, task.tokenizer, World(task.world), task.model_config, task.condition,
                              task.align, task.seed, task.runs_dir, callbacks)  # fmt: skip


@contextmanager
def fixed_numerics(threads: int = 1) -> Iterator[None]:
    """Within: ``threads`` torch threads (the reduction order of CPU matmuls depends on it) and full-precision
    fp32 matmuls; the previous settings afterwards."""
    saved = torch.get_num_threads(), torch.get_float32_matmul_precision()
    torch.set_num_threads(threads)
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.set_float32_matmul_precision(saved[1])


def default_workers() -> int:
    """Alignment runs at a time: one per CPU core available to this process."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_tasks(tasks: list[RunTask], workers: int = 1, threads: int = 1, progress=None, on_step=None) -> list[dict]:
    """Every task's result, in order. Cached runs are read here; the others run in ``workers`` spawned processes
    of ``threads`` torch threads each (``workers`` 1: in this process, on torch's current threads). The result of a
    run does not depend on where it ran (each run seeds its own generators; one thread per run as in the card).
    ``progress(done, total, note)`` after each run; ``on_step()`` after each optimizer step of any run."""
    results: list[dict | None] = [None] * len(tasks)
    todo = []
    for i, task in enumerate(tasks):
        path = run_path(task.runs_dir, task.world, task.model_config, task.condition, task.align, task.seed)
        if path is not None and path.is_file():
            results[i] = json.loads(path.read_text())
        else:
            todo.append(i)
    done = len(tasks) - len(todo)
    if progress is not None and done:
        progress(done, len(tasks), "from the run cache")
    start = time.time()
    if workers <= 1 or len(todo) <= 1:
        callbacks = [step_callback(on_step)] if on_step is not None else None
        for i in todo:
            t = tasks[i]
            results[i] = align_and_evaluate(t.model, t.tokenizer, World(t.world), t.model_config, t.condition, t.align,
                                            t.seed, t.runs_dir, callbacks)  # fmt: skip
            done += 1
            if progress is not None:
                progress(done, len(tasks), f"{t.label} ({time.time() - start:.0f} s)")
        return results  # type: ignore[return-value]
    todo.sort(key=lambda i: -(tasks[i].align.mlc_lead_steps + tasks[i].align.dpo_steps))  # longest first
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, ProcessPoolExecutor(min(workers, len(todo)), mp_context=context) as pool:
        ticks = manager.Queue() if on_step is not None else None
        futures = {pool.submit(_run_task, replace(tasks[i], ticks=ticks), threads): i for i in todo}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            while ticks is not None:
                try:
                    ticks.get_nowait()
                except queue.Empty:
                    break
                on_step()
            for future in finished:
                i = futures[future]
                results[i] = future.result()
                done += 1
                if progress is not None:
                    progress(done, len(tasks), f"{tasks[i].label} ({time.time() - start:.0f} s)")
    return results  # type: ignore[return-value]
