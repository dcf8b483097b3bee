import os
import shutil
from pathlib import Path

import pytest

from tests import support

# One thread per training process: the xdist workers then share the two cores without
# thrashing (measured: 0.041 s/step at 1 thread vs 0.039 at 2 for the tiny config), and every
# run, reference or under test, torchrun or srun, computes with the same thread count.
os.environ["OMP_NUM_THREADS"] = "1"

# How `make test` spreads the suite over its workers (-n 3 --dist load, with the scheduler below
# and --no-loadscope-reorder): most tests spend their time waiting (for SLURM to schedule and
# requeue, for a held save, for a signal's lead time), so a third worker overlaps the waits.
# Each work unit goes to the next free worker in collection order, so the slowest come first:
# the jobs on the local cluster, then the longest other real processes (LONG_FIRST), then the
# other real processes, then the unit tests. A file is one unit (its module fixtures made once),
# except the files of SPREAD, whose tests go to the workers one by one (each worker brings up its
# own cluster).
# (xdist's own --dist loadgroup cannot do this under pytest 9: it renames `item._nodeid`, which
# pytest 9 no longer reads, so its groups are silently ignored.)
SPREAD = ("tests/slurm/", "tests/integration/test_resume.py", "tests/integration/test_mirror.py",
          "tests/integration/test_checkpoints.py", "tests/integration/test_never_hang.py",
          "tests/integration/test_elastic.py", "tests/integration/test_launch_local.py",
          "tests/integration/test_bench.py", "tests/integration/test_finetune.py",
          "tests/integration/test_track.py", "tests/integration/test_sft.py",
          "tests/integration/test_module.py")


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ByCost(LoadScopeScheduling):
        """Work units: a test of a SPREAD file, or a whole other file; in collection order."""

        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::")[0]
            return nodeid if path.startswith(SPREAD) else path

    return ByCost(config, log)


# The longest units of tests/integration (`--durations`, 2026-12-04: 50-115 s each, a whole file
# where it is one unit), handed out first, in this order, so that the suite does not end on one
# of them while the other workers have nothing left.
LONG_FIRST = ("tests/integration/test_mirror.py::test_sigterm",
              "tests/integration/test_sft.py::test_world_two_resumes_exactly",
              "tests/integration/test_module.py::test_the_bridge_resumes_exactly",
              "tests/integration/test_real_text.py",
              "tests/integration/test_track.py::test_one_tracker_run",
              "tests/integration/test_launch_local.py::test_local_executor_time_limit",
              "tests/integration/test_interop.py",
              "tests/integration/test_sft.py::test_sigterm_during_an_evaluation",
              "tests/integration/test_never_hang.py::test_one_rank_out_of_memory",
              "tests/integration/test_resume.py::test_sigkill_at_each_point",
              "tests/integration/test_resume.py::test_resume_after_sigterm",
              "tests/integration/test_package.py",
              "tests/integration/test_bench.py::test_chaos_benchmark_smoke",
              "tests/integration/test_bench.py::test_finetune_benchmark_smoke",
              "tests/integration/test_mirror.py::test_a_kill",
              "tests/integration/test_watch.py")


def _cost_rank(item) -> tuple[int, int]:
    path = item.nodeid.split("::")[0]
    if item.get_closest_marker("slurm"):
        return (0 if "chaos" in item.nodeid else 1), 0
    if path.startswith("tests/integration/"):
        long = [i for i, prefix in enumerate(LONG_FIRST) if item.nodeid.startswith(prefix)]
        return (2, long[0]) if long else (3, 0)
    return 4, 0


def pytest_collection_modifyitems(config, items):
    items.sort(key=_cost_rank)  # stable: within a rank, the files' own order


def pytest_collection_finish(session):
    # What collection imported (torch, transformers, the test modules) lives as long as the
    # worker: no collection of the suite's hundreds needs to rescan it.
    import gc

    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, worker_id):
    """The run directory of an uninterrupted run of the test config, per world size, made once
    per test session (checkpoints every 20 steps, saved in the background).

    Shared by the xdist workers (their temp dirs have a common parent) under a file lock.
    """
    root = shared_root(tmp_path_factory, worker_id)
    return lambda world=1: made_once(root, "reference", world, [], support.CONFIG)


@pytest.fixture(scope="session")
def reference(reference_run):
    """The losses of the uninterrupted runs, by step, per world size."""
    return lambda world=1: support.losses(reference_run(world))


@pytest.fixture(scope="session")
def base_model(tmp_path_factory, worker_id):
    """A tiny pretrained model directory per architecture (gpt2, llama), saved once per session
    and shared by the xdist workers. Tests that change one copy it first."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        root = root.parent

    def get(arch: str) -> Path:
        out = root / f"base-{arch}"
        with FileLock(str(root / f"base-{arch}.lock")):
            if not (out / "model.safetensors").exists():
                support.save_base(out, arch)
        return out

    return get


@pytest.fixture(scope="session")
def lora_reference(base_model, tmp_path_factory, worker_id):
    """The uninterrupted LoRA run per (arch, world), made once per session and shared by the
    xdist workers (their temp dirs have a common parent) under a file lock."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        root = root.parent

    def get(arch: str, world: int):
        name = f"lora-reference-{arch}-w{world}"
        run_dir = root / name / "run"
        with FileLock(str(root / f"{name}.lock")):
            if not (root / f"{name}.done").exists():
                rc = support.run(run_dir, world, support.lora_sets(base_model(arch)),
                                 config=support.LORA_CONFIG)
                assert rc == 0, support.log_text(run_dir)
                (root / f"{name}.done").touch()
        return run_dir

    return get


@pytest.fixture(scope="session")
def preempted_run(tmp_path_factory):
    """A world-size-1 run stopped by SIGTERM after step 45: checkpoints 20, 40 and ~46."""
    run_dir = tmp_path_factory.mktemp("preempted") / "run"
    rc, _ = support.interrupt(run_dir, 45)
    assert rc == 75, support.log_text(run_dir)
    return run_dir


@pytest.fixture
def copy_of(tmp_path):
    def copy(run_dir: Path) -> Path:
        dest = tmp_path / "run"
        shutil.copytree(run_dir, dest)
        return dest

    return copy


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """The project's own single-node SLURM cluster, up for the session, down even on failure."""
    from telepathy.slurm.cluster import LocalCluster, free_port_pair

    c = LocalCluster(tmp_path_factory.mktemp("slurm-state"), free_port_pair(), grace_s=30)
    c.up()
    try:
        yield c
    finally:
        c.down()


@pytest.fixture(scope="session")
def cluster2(tmp_path_factory):
    """This worker's local cluster of two nodes, each slurmd in its own network and UTS
    namespace (root only: skipped with the reason elsewhere)."""
    import os
    import shutil

    from telepathy.slurm.cluster import LocalCluster, free_port_pair

    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("nsenter") is None:
        pytest.skip("two nodes need root and iproute2 (network namespaces, a bridge, veth pairs)")
    c = LocalCluster(tmp_path_factory.mktemp("slurm-nodes"), free_port_pair(), grace_s=30,
                     nodes=2)
    c.up()
    try:
        yield c
    finally:
        c.down()


@pytest.fixture
def process_group():
    """A one-rank gloo process group in this test process."""
    import torch.distributed

    from telepathy.engine.distributed import Dist, free_port

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}",
                                         rank=0, world_size=1)
    yield Dist(0, 1, torch.device("cpu"))
    torch.distributed.destroy_process_group()


# -- instruction tuning: the toy chats prepared with a ChatML template, a base of their vocabulary
@pytest.fixture(scope="session")
def sft_data(tmp_path_factory, worker_id):
    """The toy chats (`telepathy data toy`) prepared as chat examples with their tokenizer's
    template: {"tokenizer", "train", "val"}, made once per session, shared by the workers."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        root = root.parent
    with FileLock(str(root / "sft-data.lock")):
        if not (root / "sft-data.done").exists():
            support.make_sft_data(root / "sft-data")
            (root / "sft-data.done").touch()
    return support.sft_paths(root / "sft-data")


def shared_root(tmp_path_factory, worker_id):
    """The directory every xdist worker of this session shares (their temp dirs' parent)."""
    root = tmp_path_factory.getbasetemp()
    return root if worker_id == "master" else root.parent


def made_once(root, name: str, world: int, sets: list[str], config: str):
    """The uninterrupted run `name` at `world` ranks, made once per session under a file lock
    and shared by the workers."""
    from filelock import FileLock

    run_dir = root / f"{name}-w{world}" / "run"
    with FileLock(str(root / f"{name}-w{world}.lock")):
        if not (root / f"{name}-w{world}.done").exists():
            rc = support.run(run_dir, world, sets, config=config)
            assert rc == 0, support.log_text(run_dir)
            (root / f"{name}-w{world}.done").touch()
    return run_dir


@pytest.fixture(scope="session")
def sft_reference(sft_data, tmp_path_factory, worker_id):
    """The uninterrupted LoRA SFT run per world size (support.sft_sets), made once per session."""
    root = shared_root(tmp_path_factory, worker_id)
    return lambda world: made_once(root, "sft-reference", world, support.sft_sets(sft_data),
                                       support.SFT_CONFIG)


# -- a module of the user's own: examples/bridge on its toy models ---------------------------------
@pytest.fixture(scope="session")
def bridge_toy(tmp_path_factory, worker_id):
    """examples/bridge/make_toy.py's two frozen models and pairs, made once per session."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        root = root.parent
    with FileLock(str(root / "bridge-toy.lock")):
        if not (root / "bridge-toy.done").exists():
            support.make_bridge_toy(root / "bridge-toy")
            (root / "bridge-toy.done").touch()
    return root / "bridge-toy"


@pytest.fixture(scope="session")
def bridge_reference(bridge_toy, tmp_path_factory, worker_id):
    """The uninterrupted bridge run per world size (support.bridge_sets), its samples recorded
    beside it, made once per session."""
    root = shared_root(tmp_path_factory, worker_id)
    return lambda world: made_once(
        root, "bridge-reference", world,
        support.bridge_sets(bridge_toy, root / f"bridge-reference-w{world}" / "samples"),
        support.BRIDGE_CONFIG)


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """This worker's S3 endpoint (moto's server on 127.0.0.1); each test takes its own bucket."""
    server = support.S3Server(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()
