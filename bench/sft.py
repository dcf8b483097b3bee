"""Instruction tuning: packed rows against padded ones on a length-skewed chat set, and the cost
of evaluation, as JSON + a table.

    python -m bench.sft [--smoke] [--model tiny|1.3M] [--steps 100] [--repeats 3] [--out F]

The data: a deterministic synthetic chat set written with `ExamplesWriter` (random token ids,
the answer, the loss-counted half, after the prompt), `EXAMPLES` examples whose lengths run
log-uniformly from `MIN_LEN` to data.seq_len (many short, a few long, as chat sets are), and a
held-out set of `EVAL_FRACTION` of that size (a realistic validation split) drawn the same way.

Arms, interleaved per repeat (their order rotating; this machine is shared and noisy), each a
fresh `python -m telepathy.resume` in a fresh run directory for `--steps` steps, with no
checkpoint but the final one:
- `packed`: data.packing=true, several examples a row, none attending to another;
- `padded`: data.packing=false, one example a row, padded to data.seq_len;
- `packed_eval`: packed, with eval.path on the held-out set and eval.every_steps=50
  (checkpoint.keep_best off: its saves would be a checkpoint's cost, not the evaluation's).
Figures from each run's metrics.jsonl, over the steps after the first `WARMUP_STEPS`:
`tokens_per_s` is the median of the steps' real (non-pad) tokens per second; `end_to_end` the
sum of their real tokens over the sum of their step times. For `packed_eval`,
`end_to_end_with_eval` adds the evaluations at the rate eval.every_steps gives (the run's mean
`eval_s`, once per 50 measured steps), and `eval_cost` is the share of wall time they take:
1 - end_to_end_with_eval / end_to_end, within the same run, so no noise between arms enters.
What a row holds is the data's alone: `steps_to_epoch` (rows of an epoch / train.global_batch)
and `fill` (real tokens / row tokens over an epoch) come from `ExampleStream`.

`ratios` are medians over repeats of each repeat's side-by-side ratio: packed / padded tokens/s
(target: at least `TARGET_PACKED_VS_PADDED`), padded / packed steps to an epoch, the cost of
evaluation, and packed_eval's end-to-end with evaluation / packed's end-to-end (across arms).

The model of the full run, `1.3M` (128 wide, 4 layers, vocabulary 2048, seq_len 256, global batch
8 at world 1): on this 2-core CPU (one thread a process, `OMP_NUM_THREADS=1`) its forward and
backward take ~29 ms a row of 256 tokens at micro-batch 8 and ~34 ms at micro-batch 1, i.e.
time grows with the tokens computed, not with the calls made: compute dominates (~0.25 s a
step), as on a GPU with a real model, and a run of 100 steps takes under a minute. The tiny
config's 64-wide model is overhead-bound (11 ms for 8 rows, 3 ms for one: most of a step is
Python, DeepSpeed's hooks and the optimizer's calls), so there the time of a row would hardly
depend on its tokens; the smoke uses it only to check the behaviour, in seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench import ratios, write_report
from bench.resume import command
from telepathy.core import proc
from telepathy.core.jsonl import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny-cpu.yaml"
MODELS = {
    "tiny": [],  # configs/tiny-cpu.yaml: 64 wide, 2 layers, vocabulary 256, seq_len 64
    "1.3M": ["model.hidden_size=128", "model.intermediate_size=344", "model.num_layers=4",
             "model.num_heads=4", "model.num_kv_heads=2", "model.vocab_size=2048",
             "model.max_seq_len=256", "data.seq_len=256"],
}
ARMS = {
    "packed": ["data.packing=true"],
    "padded": ["data.packing=false"],
    "packed_eval": ["data.packing=true", "eval.every_steps=50"],
}
EVAL_EVERY = 50
EXAMPLES = 4000
"""Training examples of the full run: an epoch of 500 padded steps at global batch 8."""
SMOKE_EXAMPLES = 400
EVAL_FRACTION = 0.05
MIN_LEN = 16
WARMUP_STEPS = 5
TARGET_PACKED_VS_PADDED = 1.5


def lengths_of(count: int, longest: int, seed: int) -> np.ndarray:
    """Example lengths from MIN_LEN to `longest`, log-uniform: many short, a few long."""
    rng = np.random.default_rng(seed)
    raw = np.exp(rng.uniform(math.log(MIN_LEN), math.log(longest + 1), count))
    return np.clip(raw.astype(np.int64), MIN_LEN, longest)


def write_examples(path: Path, count: int, seq_len: int, vocab: int, seed: int) -> dict[str, Any]:
    """A synthetic chat set (random ids; the answer, counted in the loss, is the second half of
    each example) and its sidecar; returns the sidecar."""
    from telepathy.data.exfile import ExamplesWriter

    rng = np.random.default_rng(seed + 1)
    with ExamplesWriter(path, "uint16") as writer:
        for n in lengths_of(count, seq_len, seed).tolist():
            mask = np.zeros(n, dtype=np.uint8)
            mask[n // 2:] = 1
            writer.add(rng.integers(1, vocab, n), mask)  # 0 is the pad token
        meta = writer.finish({"vocab_size": vocab, "pad_token_id": 0, "example_format": "chat",
                              "tokenizer": "synthetic (bench.sft)"})
    Path(f"{path}.json").write_text(json.dumps(meta))
    return meta


def epoch_of(path: Path, seq_len: int, seed: int, vocab: int, packing: bool,
             global_batch: int) -> dict[str, Any]:
    """What the data alone says of an arm: rows and steps to one epoch, and their fill."""
    from telepathy.data.examples import ExampleStream
    from telepathy.data.exfile import Examples

    stream = ExampleStream(Examples(path), seq_len, seed, vocab, packing=packing)
    rows = stream.rows_per_epoch
    return {"rows_per_epoch": rows, "steps_to_epoch": round(rows / global_batch, 2),
            "fill": round(float(stream.lengths.sum()) / (rows * seq_len), 4)}


def run_arm(arm: str, sets: list[str], work: Path, seq_len: int, global_batch: int
            ) -> dict[str, Any]:
    """One arm's run from a fresh run directory, and its figures (see the module's docstring)."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"sft-{arm}-", dir=work)) / "run"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    try:
        proc.run(command(run_dir, 1, [*sets, *ARMS[arm]], CONFIG), timeout=1800, env=env,
                 cwd=ROOT)
        rows = list(read_jsonl(run_dir / "metrics.jsonl"))
    finally:
        shutil.rmtree(run_dir.parent, ignore_errors=True)
    steps = sorted((r for r in rows if "loss" in r), key=lambda r: r["step"])
    skip = min(WARMUP_STEPS, len(steps) // 2)
    measured = steps[skip:]
    step_s = sum(r["step_time_s"] for r in measured)
    real = sum(r["tokens_per_s"] * r["step_time_s"] for r in measured)
    out = {"measured_steps": len(measured),
           "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in measured), 1),
           "end_to_end": round(real / step_s, 1),
           "step_time_s": round(statistics.median(r["step_time_s"] for r in measured), 4),
           "run_fill": round(real / (len(measured) * global_batch * seq_len), 4)}
    evals = [r for r in rows if "eval_loss" in r]
    if evals:
        eval_s = statistics.mean(r["eval_s"] for r in evals)
        with_eval = real / (step_s + eval_s * len(measured) / EVAL_EVERY)
        out.update({"evaluations": [{k: r[k] for k in ("step", "eval_s", "eval_tokens",
                                                       "eval_rows")} for r in evals],
                    "eval_s": round(eval_s, 4), "end_to_end_with_eval": round(with_eval, 1),
                    "eval_cost": round(1 - with_eval / (real / step_s), 4)})
    return out


def run(model: str, steps: int, repeats: int, examples: int, work: Path) -> dict[str, Any]:
    from telepathy.config import load_config

    cfg = load_config(str(CONFIG), MODELS[model])
    seq_len, vocab, seed = cfg.data.seq_len, cfg.model.vocab_size, cfg.data.seed
    batch = cfg.train.global_batch
    data = Path(tempfile.mkdtemp(prefix="sft-data-", dir=work))
    try:
        train = write_examples(data / "train.ex", examples, seq_len, vocab, seed)
        held = write_examples(data / "eval.ex", max(1, round(examples * EVAL_FRACTION)), seq_len,
                              vocab, seed + 7)
        epochs = {arm: epoch_of(data / "train.ex", seq_len, seed, vocab,
                                "data.packing=true" in ARMS[arm], batch) for arm in ARMS}
        sets = [*MODELS[model], f"data.path={data / 'train.ex'}", f"eval.path={data / 'eval.ex'}",
                f"train.steps={steps}", "train.warmup_steps=1", "train.log_every=10",
                "checkpoint.every_steps=0", "monitor.interval_s=0"]
        runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
        names = list(ARMS)
        for r in range(repeats):  # interleaved, the order rotating: drift hits every arm alike
            for arm in names[r % len(names):] + names[:r % len(names)]:
                runs[arm].append(run_arm(arm, sets, work, seq_len, batch))
    finally:
        shutil.rmtree(data, ignore_errors=True)
    return report_of(model, steps, repeats, seq_len, batch, train, held, epochs, runs)


def report_of(model: str, steps: int, repeats: int, seq_len: int, batch: int,
              train: dict[str, Any], held: dict[str, Any], epochs: dict[str, dict[str, Any]],
              runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    def median(arm: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[arm])

    def paired(num: str, num_key: str, den: str, den_key: str) -> tuple[float, float]:
        """The median of the repeats' ratios, as (ratio, 1) for bench.ratios."""
        smallest = min(b[den_key] for b in runs[den])
        if smallest <= 0:
            return math.nan, smallest
        return statistics.median(a[num_key] / b[den_key]
                                 for a, b in zip(runs[num], runs[den])), 1.0

    arms = {arm: {**epochs[arm], "tokens_per_s": median(arm, "tokens_per_s"),
                  "end_to_end": median(arm, "end_to_end"),
                  "step_time_s": median(arm, "step_time_s"), "runs": runs[arm]}
            for arm in ARMS}
    arms["packed_eval"].update(eval_s=median("packed_eval", "eval_s"),
                               end_to_end_with_eval=median("packed_eval", "end_to_end_with_eval"))
    got, not_measured = ratios({
        "packed_vs_padded_tokens_per_s": paired("packed", "tokens_per_s", "padded",
                                                "tokens_per_s"),
        "padded_vs_packed_steps_to_epoch": (epochs["padded"]["steps_to_epoch"],
                                            epochs["packed"]["steps_to_epoch"]),
        "eval_cost": (median("packed_eval", "eval_cost"), 1.0),
        "packed_eval_vs_packed_end_to_end": paired("packed_eval", "end_to_end_with_eval",
                                                   "packed", "end_to_end"),
    }, digits=4)
    value = got["packed_vs_padded_tokens_per_s"]
    out = {"model": model, "seq_len": seq_len, "global_batch": batch, "world_size": 1,
           "steps": steps, "warmup_steps_skipped": min(WARMUP_STEPS, steps // 2),
           "repeats": repeats, "eval_every_steps": EVAL_EVERY,
           "data": {"train_examples": train["examples"], "train_tokens": train["tokens"],
                    "eval_examples": held["examples"], "eval_tokens": held["tokens"],
                    "lengths": f"log-uniform {MIN_LEN}..{seq_len}",
                    "mean_length": round(train["tokens"] / train["examples"], 1)},
           "arms": arms, "ratios": got,
           "targets": {"packed_vs_padded_tokens_per_s": {
               "at_least": TARGET_PACKED_VS_PADDED, "value": value,
               "met": value is not None and value >= TARGET_PACKED_VS_PADDED}}}
    if not_measured:
        out["not_measured"] = not_measured
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help="tiny model, 10 steps, one repeat, a tenth of the examples")
    p.add_argument("--model", choices=list(MODELS), default="1.3M")
    p.add_argument("--steps", type=int, default=2 * EVAL_EVERY,
                   help="steps per run (a multiple of 50: the evaluations fall on the interval)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=str(ROOT / "runs" / "bench"), help="where the runs go")
    p.add_argument("--out", help="JSON file to write")
    args = p.parse_args(argv)
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        report = run("tiny", 10, 1, SMOKE_EXAMPLES, work)
    else:
        report = run(args.model, args.steps, args.repeats, EXAMPLES, work)
    for arm, a in report["arms"].items():
        print(f"{arm:>11}: {a['tokens_per_s']:.0f} real tokens/s (end to end {a['end_to_end']:.0f}"
              f"), fill {a['fill']}, {a['steps_to_epoch']} steps to an epoch", file=sys.stderr)
    q = report["ratios"]
    print(f"packed / padded tokens/s {q['packed_vs_padded_tokens_per_s']} (target >= "
          f"{TARGET_PACKED_VS_PADDED}); evaluation every {EVAL_EVERY} steps costs "
          f"{q['eval_cost']} of the time", file=sys.stderr)
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
