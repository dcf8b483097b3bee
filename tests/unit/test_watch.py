"""tail and report on a hand-written run directory whose metrics.jsonl holds training and
evaluation lines; the readers of metrics.jsonl keep the two apart. Real runs:
tests/integration/test_watch.py."""

import json

import pytest

from telepathy.core.jsonl import evals_per_step, last_per_step, read_jsonl
from telepathy.watch import report, tail


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def trained(step, restart):
    return {"step": step, "loss": 5.0 - step / 10, "lr": 1e-3, "world_size": 1, "restart": restart,
            "time": 1000.0 + 10 * restart + step, "step_time_s": 0.5, "tokens_per_s": 900.0 + step,
            "job_id": "7"}


def evaluated(step, restart, loss):
    return {"step": step, "eval_loss": loss, "eval_tokens": 512, "eval_rows": 4, "eval_s": 0.2,
            "world_size": 1, "restart": restart, "time": 1000.5 + 10 * restart + step,
            "job_id": "7"}


TRAINED = [trained(s, 0) for s in range(1, 7)] + [trained(s, 1) for s in range(5, 9)]
EVALUATED = [(2, 0, 2.0), (4, 0, 1.5), (6, 0, 1.7), (6, 1, 1.6), (8, 1, 1.55)]
"""Allocation 0 trained 1-6 and evaluated 2, 4, 6, then crashed; allocation 1 resumed from the
checkpoint of step 4, trained 5-8 again and evaluated 6 again (its value wins) and 8."""


def run_dir(root, with_evals=True):
    """A run directory as the trainer leaves it: each evaluation line after its step's line."""
    root.mkdir()
    (root / "config.yaml").write_text("train:\n  steps: 8\n")
    evals = {(s, r): loss for s, r, loss in EVALUATED} if with_evals else {}
    write(root / "metrics.jsonl", [row for t in TRAINED for row in [t] + (
        [evaluated(t["step"], t["restart"], evals[t["step"], t["restart"]])]
        if (t["step"], t["restart"]) in evals else [])])
    best = [{"event": "best_checkpoint", "step": 4, "eval_loss": 1.5, "previous_step": 2,
             "previous_eval_loss": 2.0, "restart": 0, "time": 1004.6}] if with_evals else []
    write(root / "events.jsonl", [
        {"event": "launch", "restart": 0, "time": 1000.0, "job_id": "7"},
        {"event": "start", "step": 0, "restart": 0, "time": 1000.1},
        {"event": "checkpoint_saved", "step": 4, "restart": 0, "time": 1004.7, "bytes": 10,
         "seconds": 0.1}, *best,
        {"event": "launch", "restart": 1, "time": 1010.0, "job_id": "7"},
        {"event": "resume", "step": 4, "checkpoint": "step_00000004", "restart": 1,
         "time": 1010.1},
        {"event": "finished", "step": 8, "restart": 1, "time": 1018.9}])
    return root


def test_readers_take_training_lines_and_evaluation_lines_apart(tmp_path):
    rows = list(read_jsonl(run_dir(tmp_path / "run") / "metrics.jsonl"))
    trained_steps = last_per_step(rows)
    assert sorted(trained_steps) == list(range(1, 9))
    assert all("loss" in r for r in trained_steps.values())
    assert trained_steps[6]["restart"] == 1  # the last line of a step trained twice
    evals = evals_per_step(rows)
    assert {s: r["eval_loss"] for s, r in evals.items()} == {2: 2.0, 4: 1.5, 6: 1.6, 8: 1.55}


def test_report_json_has_each_evaluation_once_and_the_lowest_as_its_best(tmp_path):
    ev = report.build(run_dir(tmp_path / "run"))["eval"]
    assert ev["series"] == {"step": [2, 4, 6, 8], "eval_loss": [2.0, 1.5, 1.6, 1.55]}
    assert ev["best"] == {"step": 4, "eval_loss": min(ev["series"]["eval_loss"])}
    assert ev["last"] == {"step": 8, "eval_loss": 1.55}
    assert ev["best_checkpoint"] == 4


def test_evaluation_lines_leave_the_training_figures_as_they_were(tmp_path):
    with_evals = report.build(run_dir(tmp_path / "evaluated"))
    without = report.build(run_dir(tmp_path / "plain", with_evals=False))
    for key in ("series", "loss", "throughput", "step", "state", "restarts"):
        assert with_evals[key] == without[key], key
    assert with_evals["series"]["step"] == list(range(1, 9))
    assert without["eval"] == {"series": {"step": [], "eval_loss": []}, "last": None,
                               "best": None, "best_checkpoint": None}
    assert not [line for line in report.text(without).splitlines() if line.startswith("eval")]


def test_report_text_and_figure_show_the_evaluations_beside_the_training_loss(tmp_path):
    built = report.build(run_dir(tmp_path / "run"))
    assert ("eval       last 1.5500 at step 8, best 1.5000 at step 4, best checkpoint step 4"
            in report.text(built).splitlines())
    fig = report.figure(built)
    loss_axes = fig.axes[0]
    lines = {line.get_label(): line for line in loss_axes.get_lines()}
    assert list(lines["eval loss"].get_xdata()) == [2, 4, 6, 8]
    assert list(lines["eval loss"].get_ydata()) == [2.0, 1.5, 1.6, 1.55]
    assert lines["eval loss"].get_marker() == "o"
    assert list(lines["train loss"].get_xdata()) == list(range(1, 9))
    assert "eval loss" in [t.get_text() for t in loss_axes.get_legend().get_texts()]
    report.png(built, tmp_path / "run.png")
    from PIL import Image
    with Image.open(tmp_path / "run.png") as img:
        assert img.size == (1000, 600)


@pytest.mark.parametrize("with_evals", [True, False])
def test_tail_shows_the_newest_and_the_best_evaluation(tmp_path, capsys, with_evals):
    root = run_dir(tmp_path / "run", with_evals)
    assert tail.main([str(root), "--once", "--no-slurm"]) == 0
    out = capsys.readouterr().out.splitlines()
    evals = [line.split(None, 1) for line in out if line.startswith("eval ")]
    if not with_evals:
        assert evals == []
        return
    assert evals == [["eval", "1.5500 at step 8 (best 1.5000 at step 4), best checkpoint step 4"]]
    loss, = [line for line in out if line.startswith("loss ")]
    assert loss.split()[1] == f"{trained(8, 1)['loss']:.4f}"  # the training loss, not an eval's


def test_tail_and_report_say_when_mirror_uploads_fail_and_when_they_caught_up(tmp_path, capsys):
    root = run_dir(tmp_path / "run", with_evals=False)
    events = root / "events.jsonl"
    up = lambda step, t: {"event": "mirror_uploaded", "step": step,  # noqa: E731
                          "checkpoint": f"step_{step:08d}", "time": t, "seconds": 0.5}
    failed = lambda t, n: {"event": "mirror_failed", "url": "s3://b/r", "time": t,  # noqa: E731
                           "error": "ReadTimeoutError: timed out", "failures": n}
    with events.open("a") as f:
        for e in (up(4, 1005.0), failed(1006.0, 1), failed(1007.0, 2)):
            f.write(json.dumps(e) + "\n")
    seen = report.build(root)
    assert seen["mirror"]["failing"] == {"since": 1006.0, "failures": 2,
                                         "error": "ReadTimeoutError: timed out"}
    assert any("mirror uploads failing" in w for w in seen["warnings"])
    assert "mirror uploads failing" in report.text(seen)
    assert tail.main([str(root), "--once", "--no-slurm"]) == 0
    shown = capsys.readouterr().out
    assert "FAILING" in shown and "mirror uploads failing" in shown
    with events.open("a") as f:
        f.write(json.dumps(up(8, 1008.0)) + "\n")
    seen = report.build(root)
    assert seen["mirror"]["failing"] is None and seen["mirror"]["uploaded"]["step"] == 8
    assert not any("mirror" in w for w in seen["warnings"])
