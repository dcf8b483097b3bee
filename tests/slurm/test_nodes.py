"""Two nodes of the local cluster (slurm/local/up.sh with TELEPATHY_SLURM_NODES=2): each slurmd
in its own network and UTS namespace on a bridge, the filesystem shared. A job on both nodes
is preempted (each node's rank hears the signal), requeued under its id, resumed on both, every
loss bit for bit; a job of 1-2 nodes loses a node, resumes on the other, then on both again;
telepathy.launch submits on two nodes."""

import re
import subprocess
import time

import pytest

from telepathy.core.jsonl import wait_for_step
from telepathy.slurm import scontrol
from tests import support
from tests.support import RNG, Job, assert_close_losses, assert_same_state

pytestmark = pytest.mark.slurm


def test_a_two_node_job_scancel_term_requeues_and_resumes_exactly_on_two_nodes(
        cluster2, tmp_path, reference):
    # The nodes are apart: two hostnames, two network namespaces, two addresses.
    seen = subprocess.run(["srun", "-N2", "bash", "-c", "echo $(hostname) "
                           "$(readlink /proc/self/ns/net)"], capture_output=True, text=True,
                          env=cluster2.env(), timeout=60)
    assert seen.returncode == 0, seen.stderr
    hosts = dict(line.split() for line in seen.stdout.splitlines())
    assert sorted(hosts) == ["n1", "n2"] and len(set(hosts.values())) == 2, seen.stdout

    job = Job(cluster2, tmp_path, gpus=1, sbatch_args=["--nodes=2"])
    job.wait_step(RNG.randrange(5, 40))
    job.term()
    assert job.wait_end() == ("COMPLETED", 1), job.logs()
    info = scontrol.show_job(job.id, env=cluster2.env())
    assert info["NumNodes"] == "2" and info["NodeList"] == "n[1-2]", info
    # one rank per node: a world of two, equal bit for bit to one node's world of two
    support.assert_same_losses(job.run_dir, reference(2))
    assert {r["world_size"] for r in support.metrics(job.run_dir)} == {2}
    requeue, = support.events(job.run_dir, "requeue")
    assert requeue["cause"] == "user" and requeue["job_id"] == job.id
    # SLURM signalled the rank on each node itself (through that node's slurmd): each heard it
    preempted, = support.events(job.run_dir, "preempted")
    assert [(h["rank"], h["host"], h["signal"]) for h in preempted["heard"]] == \
        [(0, "n1", "SIGTERM"), (1, "n2", "SIGTERM")]
    # each node's monitor (its local rank 0) wrote under its own hostname
    assert (job.run_dir / "system-n1.jsonl").exists() and (job.run_dir / "system-n2.jsonl").exists()


def test_a_node_lost_the_run_resumes_on_the_other_then_on_both_when_it_returns(
        cluster2, tmp_path, reference):
    """`--nodes=1-2`: node n2 vanishes after the checkpoint of step 20, as on a power loss:
    every process on it stopped and its link cut, so no connection to it closes. The rank on
    n1 hears no more heartbeats from n2 and leaves after train.node_timeout_s (a `node_lost`
    event; it does not wait in its collective for the watchdog); SLURM marks n2 down and
    requeues the job, which resumes on n1 alone (2 -> 1 ranks); n2 comes back, a SIGTERM
    requeues the job, and it resumes on both (1 -> 2) and finishes: losses within 1e-5 of the
    two-rank run, the full optimizer state equal across both conversions. (A node whose
    processes are killed while its kernel lives closes their connections, and the ranks
    elsewhere leave at their next collective: the chaos test's node_fail.)"""
    dumps = tmp_path / "dumps"
    # Every step sleeps 0.6 s (not in the maths): the allocation on n1 alone trains its 40
    # steps in no less than 24 s, room for n2's slurmd to start and register (a few seconds)
    # before the SIGTERM, however fast this machine is.
    job = Job(cluster2, tmp_path, gpus=1, sbatch_args=["--nodes=1-2"],
              sets=["train.node_timeout_s=10"],
              env={"TELEPATHY_FAULT": "step.start@*,sleep=0.6", "TELEPATHY_DUMP_STATE": str(dumps)})
    job.wait_step(RNG.randrange(22, 30))
    assert scontrol.show_job(job.id, env=cluster2.env())["NodeList"] == "n[1-2]"
    assert cluster2.vanish_node("n2") >= 3  # slurmd, its step daemon, the rank (and the shell's)
    deadline = time.monotonic() + 180
    while not support.events(job.run_dir, "node_lost"):
        assert time.monotonic() < deadline, job.logs()
        time.sleep(0.5)
    # the rank on n1 left on its own, from the heartbeats, before SLURM noticed anything
    lost_node, = support.events(job.run_dir, "node_lost")
    assert (lost_node["rank"], lost_node["host"], lost_node["lost_host"]) == (0, "n1", "n2")
    assert lost_node["silent_s"] >= lost_node["timeout_s"] == 10 and lost_node["beats_seen"] > 0
    assert not support.events(job.run_dir, "error"), "a collective noticed first"
    while not cluster2.node_states().get("n2", "").startswith("down"):
        assert time.monotonic() < deadline, "SLURM never marked n2 down"
        time.sleep(1)
    while not support.events(job.run_dir, "world_size_changed"):
        assert time.monotonic() < deadline, job.logs()
        time.sleep(1)
    lost = support.events(job.run_dir, "world_size_changed")[0]["step"]
    assert lost == 20
    # SLURM ended the allocation (node failure) and requeued the job itself: the srun on n1
    # waits for the step on the unreachable n2 until the node is declared down, so the job
    # script's requeue step never runs; the job came back under its id, on n1 alone.
    while not [r for r in support.metrics(job.run_dir) if r["world_size"] == 1 and r["step"] > lost]:
        assert time.monotonic() < deadline, job.logs()  # a step trained on n1 alone
        time.sleep(0.5)

    cluster2.fail_node("n2")  # its stopped processes go; then n2 boots again
    cluster2.up()  # n2's link and slurmd again; SLURM returns the node to service
    while cluster2.node_states().get("n2") != "idle":
        assert time.monotonic() < deadline, cluster2.node_states()
        time.sleep(0.5)
    job.term()
    state, restarts = job.wait_end()
    assert state == "COMPLETED" and restarts >= 2, job.logs()

    # Two ranks, then one or more allocations on n1 alone, then two again. (More than one of
    # each: SLURM's retried kill of a failed allocation reaches the job's next allocation on
    # a node, a SIGTERM or a SIGKILL the run survives; see docs/slurm.md.)
    sizes = "".join(str(e["world_size"]) for e in support.events(job.run_dir, "launch"))
    assert re.fullmatch("21+2+", sizes), sizes
    assert scontrol.show_job(job.id, env=cluster2.env())["NodeList"] == "n[1-2]"
    changes = support.events(job.run_dir, "world_size_changed")
    pairs = "".join(f"{e['from_world_size']}{e['to_world_size']}" for e in changes)
    assert re.fullmatch("(21)+(12)+", pairs), pairs
    assert {e["step"] for e in changes if e["to_world_size"] == 1} == {lost}
    back = [e for e in changes if e["to_world_size"] == 2][0]["step"]
    assert_same_state(dumps / f"saved-step{lost}-w2.safetensors",
                      dumps / f"loaded-step{lost}-w1.safetensors")
    assert_same_state(dumps / f"saved-step{back}-w1.safetensors",
                      dumps / f"loaded-step{back}-w2.safetensors")
    assert_close_losses(support.losses(job.run_dir), reference(2), exact_until=lost)
    # The rank on n1 did not wait for a collective's timeout or its watchdog: no hang.
    assert not support.events(job.run_dir, "hang")


def test_launch_submit_runs_on_two_nodes_and_job_results_returns_the_summary(
        cluster2, tmp_path, reference, monkeypatch):
    """telepathy.launch.submit(..., nodes=2): submitit's job on both nodes, one rank each,
    preempted by scancel -s TERM and requeued under its id; job.results() returns rank 0's
    summary and None for the other task."""
    import submitit

    import telepathy.launch

    for key, value in cluster2.env().items():
        monkeypatch.setenv(key, value)
    run_dir = tmp_path / "run"
    job = telepathy.launch.submit(support.CONFIG, run_dir, gpus=1, nodes=2, overrides=support.SETS)
    assert isinstance(job, submitit.Job) and job.num_tasks == 2
    script = job.paths.submission_file.read_text()
    assert "#SBATCH --nodes=2\n" in script and "#SBATCH --ntasks-per-node=1\n" in script
    wait_for_step(run_dir / "metrics.jsonl", RNG.randrange(5, 40), 240)
    scontrol.scancel(job.job_id, signal="TERM", env=cluster2.env())
    deadline = time.monotonic() + 420
    while not job.done():
        assert time.monotonic() < deadline, f"job {job.job_id} not done: {job.state}"
        time.sleep(1)
    summary, other = job.results()
    assert other is None and summary["status"] == "finished" and summary["restarts"] == 1
    support.assert_same_losses(run_dir, reference(2))
    assert {e["world_size"] for e in support.events(run_dir, "launch")} == {2}
    assert scontrol.show_job(job.job_id, env=cluster2.env())["NodeList"] == "n[1-2]"
