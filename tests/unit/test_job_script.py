"""The sbatch template says what the code expects: signal, lead time, requeue, appended logs."""

import re

from telepathy.config import load_config
from tests.support import ROOT

SCRIPT = ROOT / "slurm" / "preemptible.slurm"


def directives():
    lines = [s for s in SCRIPT.read_text().splitlines() if s.startswith("#SBATCH")]
    return {m.group(1): (m.group(2), m.group(3)) for m in
            (re.match(r"#SBATCH --([\w-]+)(?:=(\S+))?\s*(#.*)?$", s) for s in lines)}


def test_every_directive_is_explained_by_a_comment():
    for name, (_, comment) in directives().items():
        assert comment and len(comment) > 10, f"--{name} has no comment"


def test_grace_signal_matches_the_production_config():
    cfg = load_config(ROOT / "configs" / "llama-1b-h100.yaml")
    signal, lead = directives()["signal"][0].split("@")
    assert not signal.startswith("B:"), "the warning must reach the srun ranks, not the batch shell"
    assert f"SIG{signal}" in cfg.preemption.signals and int(lead) == cfg.slurm.signal_lead_s


def test_requeue_append_and_one_rank_per_gpu():
    d = directives()
    assert "requeue" in d and d["open-mode"][0] == "append"
    assert d["output"][0] == "runs/logs/%x-%j.out" and d["error"][0] == "runs/logs/%x-%j.err"
    assert d["gpus-per-node"][0] == "h100:4"
    text = SCRIPT.read_text()
    assert 'srun --ntasks-per-node="$ranks"' in text and "--kill-on-bad-exit=1" in text
    assert "-m telepathy.resume" in text and "-m telepathy.requeue" in text
    assert (ROOT / "runs" / "logs").is_dir(), "sbatch does not create the output directory"


def test_the_launchers_batch_shell_lines_are_the_job_scripts():
    """telepathy.launch renders these lines into submitit's sbatch file: the same as the script's."""
    from telepathy.slurm.jobspec import AFTER_SRUN, RANK_ENV

    text = SCRIPT.read_text()
    assert RANK_ENV in text and AFTER_SRUN in text
    assert text.index(RANK_ENV) < text.index("\nsrun ") < text.index(AFTER_SRUN)


def test_the_launchers_sbatch_options_come_from_the_config():
    from telepathy.slurm.jobspec import sbatch_args

    cfg = load_config(ROOT / "configs" / "llama-1b-h100.yaml")
    d = directives()
    for arg in sbatch_args(cfg, cfg.slurm.gpus_per_node):
        name, value = arg[2:].split("=", 1)
        script = d[name][0]
        if name == "time":  # HH:MM:SS in the script, minutes from the config
            h, m, sec = map(int, script.split(":"))
            script = str(h * 60 + m + sec // 60)
        assert script == value, f"--{name}: script {d[name][0]}, config {value}"
