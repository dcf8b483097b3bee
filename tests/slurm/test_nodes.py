"""Two nodes of the local cluster (slurm/local/up.sh with TELEPATHY_SLURM_NODES=2): each slurmd
in its own network and UTS namespace on a bridge, the filesystem shared. A job on both nodes
is preempted, requeued under its id, resumed on both, every loss bit for bit."""

import subprocess

import pytest

from telepathy.slurm import scontrol
from tests import support
from tests.support import RNG, Job

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
    # each node's monitor (its local rank 0) wrote under its own hostname
    assert (job.run_dir / "system-n1.jsonl").exists() and (job.run_dir / "system-n2.jsonl").exists()
