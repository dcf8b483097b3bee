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
