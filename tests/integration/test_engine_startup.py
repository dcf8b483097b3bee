"""What the engine's start-up skips, checked in a fresh interpreter (a module import is
process-wide): DeepSpeed's Muon optimizer module, which compiles kernels on import only to
answer "is the optimizer Muon?", stands in as a class nothing is an instance of; DeepSpeed's
autotuner does not import mlflow (installed with the `[mlflow]` extra) into every rank, and the
process can still import it."""

import subprocess
import sys

from tests import support

CHECK = """
import sys, torch
from telepathy.engine import adapter
adapter.use_cpu_accelerator()
assert adapter.skip_muon_import() and not adapter.skip_muon_import()  # once, then left alone
deepspeed = adapter.import_deepspeed()
from deepspeed.autotuning import autotuner
assert "mlflow" not in sys.modules and not autotuner.has_mlflow
import importlib.util
if importlib.util.find_spec("mlflow") is not None:  # installed (the [mlflow] extra)
    import mlflow  # the block is gone once deepspeed is imported
from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam
opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
assert not isinstance(opt, MuonWithAuxAdam) and "stand-in" in sys.modules[adapter.MUON_MODULE].__doc__
print(sorted(m for m in sys.modules if ".muon." in m))
"""


def test_deepspeeds_muon_module_is_a_stand_in_and_compiles_nothing():
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True,
                          cwd=support.ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # only the stand-in: none of the modules whose kernels compile on import
    assert done.stdout.strip() == "['deepspeed.runtime.zero.muon.muon_optimizer']"
