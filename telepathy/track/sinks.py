"""One class per tracker, each importing its package only when opened (in the relay process).

A sink holds one tracker run per run directory. `open` says how far the tracker already got
(`hwm`: the last step whose training scalars it holds, 0: none); the relay then sends every step
past it once. How each keeps a step from appearing twice:

- TensorBoard: `SummaryWriter(purge_step=P)` makes every reader drop what earlier files hold from
  step P on; P is the step after the last one known flushed (or after the resumed checkpoint,
  whichever is lower), and the relay sends again what it purged.
- W&B and MLflow cannot forget a step: `hwm` is read back from the tracker's own records (the
  offline run files through `wandb leet inspect`, MLflow's metric history), and steps at or
  below it are not sent again. telepathy resumes bit for bit, so a step trained again has the
  loss, lr and gradient norm the tracker already holds; only its timings differ.

Evaluations (eval/loss, eval/tokens) the same way, with their own mark (`held_evals`): the last
evaluated step the tracker holds. TensorBoard's purge step is also no later than the step after
the last one whose evaluation was known settled; MLflow reads eval/loss back; W&B reads back
`eval/step`, the x axis of its eval/ charts, so that an evaluation of a step W&B already holds
(the evaluation a preemption stopped, done again after the resume) joins its next row and is
still drawn at its step.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config.schema import TrackConfig
from ..core import proc


@dataclass
class Context:
    run_dir: Path
    config: dict[str, Any]
    """The resolved config (to_dict), logged once as hyperparameters."""
    track: TrackConfig
    resume_step: int
    state: dict[str, Any] = field(default_factory=dict)
    """This sink's entry of track/state.json (run ids, hwm), updated in place."""
    persist: Callable[[], None] = lambda: None
    """Write track/state.json now (a run id, the moment it exists: a relay killed later must
    not make the next allocation open a second tracker run)."""


class Sink:
    name = "sink"
    exact_steps = False
    """True: it accepts steps in any order (TensorBoard, MLflow); False: only rising steps, and
    anything else is merged into the next step (W&B)."""

    def open(self, ctx: Context) -> int:
        raise NotImplementedError

    def held_evals(self, ctx: Context, hwm: int) -> int:
        """After `open`: the last evaluated step whose evaluation it holds (0: none); nothing at
        or below it is sent again. By default `hwm`: a tracker that holds a step holds the
        evaluation logged with it (TensorBoard: purged from where that is not known)."""
        return hwm

    def step(self, step: int, scalars: dict[str, float], notes: list[str]) -> None:
        raise NotImplementedError

    def evaluation(self, step: int, scalars: dict[str, float]) -> None:
        """An evaluation's scalars at the step it evaluated (after that step's own scalars)."""
        self.step(step, scalars, [])

    def extra(self, step: int, scalars: dict[str, float], notes: list[str]) -> None:
        """Scalars and notes of an event or a health sample at `step` (which may lie behind)."""
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def close(self, finished: bool) -> None:
        pass

    def where(self) -> str:
        """Where an operator finds the run (a directory, a run id, a URL)."""
        return ""


# -- TensorBoard -----------------------------------------------------------------------------------
def purge_step(state: dict[str, Any], resume_step: int) -> int:
    """Where TensorBoard forgets what earlier allocations wrote: the step after the last one known
    flushed with every evaluation up to it (track/state.json's `hwm` and `eval_hwm`; an evaluation
    follows its step's line, so it may be unsettled after the last flush), or after the checkpoint
    resumed from, whichever is lower."""
    flushed = int(state.get("hwm", 0))
    settled = int(state.get("eval_hwm", flushed))  # a state written before evaluations existed
    return min(flushed, settled, resume_step) + 1


class TensorBoard(Sink):
    name = "tensorboard"
    exact_steps = True

    def open(self, ctx: Context) -> int:
        from torch.utils.tensorboard import SummaryWriter

        self.dir = ctx.run_dir / "tensorboard"
        self.purge_from = purge_step(ctx.state, ctx.resume_step)
        existing = self.dir.is_dir() and any(self.dir.glob("events.out.tfevents.*"))
        self.writer = SummaryWriter(str(self.dir), purge_step=self.purge_from if existing else None,
                                    flush_secs=3600)
        if not ctx.state.get("hparams"):
            self._hparams(ctx.config)
            ctx.state["hparams"] = True
        return self.purge_from - 1

    def _hparams(self, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        from .records import flat_config

        flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                for k, v in flat_config(config).items()}
        for summary in hparams(flat, {"train/loss": 0.0}):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=1) + "\n```", 0)

    def step(self, step: int, scalars: dict[str, float], notes: list[str]) -> None:
        self.extra(step, scalars, notes)

    def extra(self, step: int, scalars: dict[str, float], notes: list[str]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        if notes:
            self.writer.add_text("events", "  \n".join(notes), step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self, finished: bool) -> None:
        self.writer.close()

    def where(self) -> str:
        return str(self.dir)


# -- Weights & Biases ----------------------------------------------------------------------------
_HISTORY = re.compile(r"^# record \d+: history\n((?:.*\n)*?)  step: \{\n    num: (\d+)", re.M)
_EVAL_STEP = re.compile(r'key: "eval/step"\n *value_json: "([^"]+)"')


def wandb_offline_steps(wandb_dir: Path, run_id: str, direct: bool = True) -> list[int]:
    """Every history step of the offline runs of `run_id` under `wandb_dir`, in file order."""
    return [step for step, _ in wandb_offline_history(wandb_dir, run_id, direct)]


def wandb_offline_history(wandb_dir: Path, run_id: str,
                          direct: bool = True) -> list[tuple[int, int | None]]:
    """Every history row of the offline runs of `run_id` under `wandb_dir`, in file order: its
    step and the evaluated step it carries (`eval/step`; None: no evaluation), read by W&B's own
    reader: `wandb leet inspect`, which prints the records when not on a terminal.

    The reader is wandb-core's; `wandb leet inspect FILE` only finds that binary and runs it as
    below, after importing the whole W&B command line (1.2 s of CPU a file on 2 cores, against
    0.01 s for the reader itself). So the binary is run directly, with the arguments the command
    gives it; where that fails (a W&B that moved it), or with `direct=False`, through the
    command.
    """
    rows: list[tuple[int, int | None]] = []
    files = sorted(wandb_dir.glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    env = {**os.environ, "WANDB_SILENT": "true"}
    core = _wandb_core() if files and direct else None
    for f in files:
        out = None
        if core is not None:
            try:
                done = proc.run([core, "leet", "--no-observability", "--inspect", "--run-file",
                                 str(f.resolve()), str(f.resolve().parent.parent)],
                                timeout=300, env=env, check=False)
                out = done.stdout if done.returncode == 0 else None
            except proc.CommandError:  # not there, or it hung
                out = None
        if out is None:
            exe = Path(sys.executable).with_name("wandb")
            out = proc.run([str(exe) if exe.exists() else "wandb", "leet", "inspect", str(f)],
                           timeout=300, env=env).stdout
        rows += history_rows(out)
    return rows


def history_rows(printed: str) -> list[tuple[int, int | None]]:
    """The history records `wandb leet inspect` printed: each one's step and its eval/step."""
    rows = []
    for items, step in _HISTORY.findall(printed):
        evaluated = _EVAL_STEP.search(items)
        rows.append((int(step), int(float(evaluated.group(1))) if evaluated else None))
    return rows


def _wandb_core() -> str | None:
    """wandb-core's path, as `wandb leet` finds it; None where it cannot be found."""
    try:
        from wandb.util import get_core_path

        return str(get_core_path())
    except Exception:  # any failure: the command line's own way
        return None


class Wandb(Sink):
    name = "wandb"

    def open(self, ctx: Context) -> int:
        import wandb

        cfg = ctx.track.wandb
        run_id = ctx.state.get("run_id")
        if not run_id:  # kept before the run exists: a crash in init cannot make a second one
            import secrets
            import string

            run_id = ctx.state["run_id"] = "".join(
                secrets.choice(string.ascii_lowercase + string.digits) for _ in range(12))
            ctx.persist()
        self.mode = cfg.mode
        self.wandb_dir = ctx.run_dir / "wandb"
        # What W&B holds, from W&B itself: a logged step may still have been queued in
        # wandb-core when the relay was killed, so track/state.json cannot tell.
        held: list[tuple[int, int | None]] = []
        if self.mode == "offline" and self.wandb_dir.is_dir():
            held = wandb_offline_history(self.wandb_dir, run_id)
        hwm = max([0, *(step for step, _ in held)])
        self.evals = max([0, *(e for _, e in held if e is not None)])
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, id=run_id, name=cfg.run_name or ctx.run_dir.name,
            tags=cfg.tags or None, mode=cfg.mode, dir=str(ctx.run_dir),
            resume=None if self.mode == "offline" else "allow",
            config=ctx.config, allow_val_change=True,
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True,
                                    x_disable_meta=True, x_save_requirements=False))
        # Evaluations are drawn against their own step: one that joins a later row (its step's
        # row was logged before it) is still drawn where it belongs.
        self.run.define_metric("eval/step")
        self.run.define_metric("eval/*", step_metric="eval/step")
        if self.mode == "online":
            hwm = max(hwm, int(getattr(self.run, "starting_step", 0) or 0) - 1)
            self.evals = max(self.evals, int(self.run.summary.get("eval/step") or 0))
            ctx.state["url"] = self.run.url
        self.current = hwm
        self.logged_here = False
        self.pending: dict[str, Any] = {}
        self.pending_notes: list[str] = []
        return hwm

    def step(self, step: int, scalars: dict[str, float], notes: list[str]) -> None:
        data: dict[str, Any] = {**self.pending, **scalars}
        texts = self.pending_notes + notes
        if texts:
            data["run/events"] = "\n".join(texts)
        self.run.log(data, step=step)
        self.current = step
        self.logged_here = True
        self.pending, self.pending_notes = {}, []

    def held_evals(self, ctx: Context, hwm: int) -> int:
        return self.evals  # read back: the evaluated steps (eval/step) its rows carry

    def evaluation(self, step: int, scalars: dict[str, float]) -> None:
        data = {**scalars, "eval/step": step}
        if step > self.current or (step == self.current and self.logged_here):
            self.step(step, data, [])  # its step's row, beside that step's training scalars
        else:  # a step W&B held before this allocation: the next row carries it
            self.extra(step, data, [])

    def extra(self, step: int, scalars: dict[str, float], notes: list[str]) -> None:
        # W&B takes rising steps only: what belongs to a step behind joins the row this process
        # logged last (a second log at the same step merges into its row), or the next one.
        self.pending.update(scalars)
        self.pending_notes += notes
        if self.logged_here:
            self.step(self.current, {}, [])

    def close(self, finished: bool) -> None:
        if (self.pending or self.pending_notes) and self.logged_here:
            self.step(self.current, {}, [])  # merges into the row logged last
        # (Without a row of its own this allocation cannot place them: a step W&B already holds
        # would appear twice across the offline files. They stay in events.jsonl; an evaluation
        # is not read back as held, and the next allocation sends it again.)
        self.run.finish(exit_code=0 if finished else 1)

    def where(self) -> str:
        if self.mode == "online":
            return f"run {self.run.id}: {self.run.url}"
        return (f"run {self.run.id}, offline: {self.wandb_dir}/offline-run-*-{self.run.id} "
                f"(upload: wandb sync {self.wandb_dir}/offline-run-*-{self.run.id})")


BATCH_METRICS = 1000
"""MLflow's limit of metrics in one log_batch call."""


# -- MLflow -------------------------------------------------------------------------------------------
class Mlflow(Sink):
    name = "mlflow"
    exact_steps = True

    def open(self, ctx: Context) -> int:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        cfg = ctx.track.mlflow
        local = cfg.tracking_uri is None
        self.uri = cfg.tracking_uri or f"sqlite:///{ctx.run_dir / 'mlflow' / 'mlflow.db'}"
        if local:
            (ctx.run_dir / "mlflow").mkdir(parents=True, exist_ok=True)
        self.client = client = MlflowClient(tracking_uri=self.uri)
        run_id = ctx.state.get("run_id")
        if not run_id:
            experiment = client.get_experiment_by_name(cfg.experiment)
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(
                cfg.experiment, artifact_location=(ctx.run_dir / "mlflow" / "artifacts").as_uri()
                if local else None)
            run_id = client.create_run(experiment_id, run_name=ctx.run_dir.name,
                                       tags={"telepathy.run_dir": str(ctx.run_dir)}).info.run_id
            ctx.state["run_id"] = run_id
            ctx.state["tracking_uri"] = self.uri
            ctx.persist()
        self.run_id = run_id
        client.update_run(run_id, status="RUNNING")
        held = client.get_run(run_id).data.params
        from .records import flat_config

        params = [Param(k, str(v)[:6000]) for k, v in flat_config(ctx.config).items()
                  if k not in held]
        for i in range(0, len(params), 100):
            client.log_batch(run_id, params=params[i:i + 100])
        steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
        self.notes: list[str] = list(ctx.state.get("notes", []))
        self.notes_sent = len(self.notes)
        self.buffer: list[Any] = []
        self.ctx = ctx
        return max([0, *steps])  # what MLflow holds, from MLflow itself

    def held_evals(self, ctx: Context, hwm: int) -> int:
        return max([0, *(m.step for m in self.client.get_metric_history(self.run_id, "eval/loss"))])

    def _log(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        group = [Metric(k, v, now, step) for k, v in scalars.items()]
        if group:
            self.buffer.append(group)

    def step(self, step: int, scalars: dict[str, float], notes: list[str]) -> None:
        self.extra(step, scalars, notes)

    def extra(self, step: int, scalars: dict[str, float], notes: list[str]) -> None:
        self._log(step, scalars)
        self.notes += notes

    def flush(self) -> None:
        # One transaction per batch (a few seconds of steps), not one per step; a step's metrics
        # never split across two (what MLflow holds is whole steps, read back by train/loss).
        while self.buffer:
            batch: list[Any] = []
            while self.buffer and len(batch) + len(self.buffer[0]) <= BATCH_METRICS:
                batch += self.buffer.pop(0)
            if not batch:  # one step with more than BATCH_METRICS metrics
                batch = self.buffer.pop(0)
            self.client.log_batch(self.run_id, metrics=batch)
        if len(self.notes) != self.notes_sent:
            self.client.log_text(self.run_id, "\n".join(self.notes) + "\n", "telepathy/events.txt")
            self.notes_sent = len(self.notes)
            self.ctx.state["notes"] = self.notes

    def close(self, finished: bool) -> None:
        self.flush()
        self.client.set_terminated(self.run_id, "FINISHED" if finished else "KILLED")

    def where(self) -> str:
        return f"run {self.run_id} at {self.uri}"


SINKS = {"tensorboard": TensorBoard, "wandb": Wandb, "mlflow": Mlflow}

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
"""The module each tracker needs; `pip install 'telepathy[<tracker>]'` installs it."""
