"""On a CUDA GPU: the same code path in bf16 with NCCL resumes bit-exactly. Skipped elsewhere."""

import pytest
import torch

from tests import support
from tests.support import RNG

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA GPU: the bf16 + NCCL path of the same code")]


def test_gpu_bf16_resume_after_sigterm_matches_uninterrupted_losses(tmp_path):
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    assert support.run(ref_dir) == 0, support.log_text(ref_dir)
    launch = support.events(ref_dir, "launch")[0]
    assert launch["device"] == "cuda"
    ref = support.losses(ref_dir)
    rc, _ = support.interrupt(run_dir, RNG.randrange(5, 40))
    assert rc == 75, support.log_text(run_dir)
    assert support.run(run_dir) == 0, support.log_text(run_dir)
    got = support.losses(run_dir)
    assert sorted(got) == sorted(ref)
    assert [s for s in ref if got[s] != ref[s]] == [], "bf16 losses differ after the resume"
    assert all("gpu_mem_peak_gb" in r for r in support.metrics(run_dir))
