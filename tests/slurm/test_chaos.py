"""The chaos harness against the real local cluster: a short seeded run of mixed faults (a rank
SIGKILLed, a rank SIGSTOPped, a node's slurmd and the job's processes on it killed, a SIGKILL
inside a save, `scancel -s TERM`, a byte of the newest checkpoint flipped), each detected,
requeued and resumed, every loss equal to the uninterrupted run's. The job is
`telepathy chaos --config examples/bridge/bridge-cpu.yaml`: a model and a dataset of the user's
own code (two frozen LMs and a trained bridge, the frozen models left out of the checkpoints);
the Hugging Face models of telepathy's own configs run the same faults in bench/chaos.py.
As root (as CI runs) the job spans two nodes of a local cluster of two (one rank on each) and
node_fail kills one of them; without root, one node with two ranks. The long soaks (30+ faults
of every kind on one node, 15 on two) are bench/chaos.py."""

import json

import pytest

from telepathy.chaos.harness import Harness, Options
from telepathy.core.jsonl import read_jsonl
from tests import support
from tests.support import RNG

pytestmark = pytest.mark.slurm

KINDS = ("rank_kill", "rank_hang", "node_fail", "save_kill", "scancel_term", "bitflip")
HANG_TIMEOUT_S = 20  # the config's floor is 10; the soak (bench/chaos.py) keeps the harness's 45


def test_a_short_seeded_chaos_run_recovers_every_fault_exactly(request, tmp_path, monkeypatch,
                                                               bridge_toy):
    try:
        cluster, nodes = request.getfixturevalue("cluster2"), 2
    except pytest.skip.Exception:  # no namespaces here: the same faults on one node
        cluster, nodes = request.getfixturevalue("cluster"), 1
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))  # the harness uses this cluster
    seed = RNG.randrange(1000)
    harness = Harness(Options(support.BRIDGE_CONFIG, faults=len(KINDS), seed=seed, kinds=KINDS,
                              gpus=2 // nodes, nodes=nodes, workdir=tmp_path / "chaos",
                              last=("node_fail",),
                              sets=(f"train.hang_timeout_s={HANG_TIMEOUT_S}",
                                    *support.bridge_sets(bridge_toy)[:6])))
    result = harness.run()
    s = result.summary
    logs = (tmp_path / "chaos" / "chaos.err").read_text(errors="replace")
    why = f"seed {seed}: {json.dumps(result.to_json())}\n{logs[-3000:]}"
    assert s["ok"], why
    assert (s["injected"], s["recovered"], s["lost_runs"]) == (6, 6, 0), why
    assert s["exact"] and s["close_steps"] == 0 and s["bit_exact_steps"] == s["steps"], why
    assert s["resumable_always"] and s["resumable_samples"] > 10, why
    assert (s["nodes"], s["world_size"]) == (nodes, 2), why
    faults = {f.kind: f for f in result.faults}
    assert sorted(faults) == sorted(KINDS), why
    events = list(read_jsonl(tmp_path / "chaos" / "run" / "events.jsonl"))
    hangs = [e for e in events if e["event"] == "hang"]
    # 1. One rank SIGKILLed: srun stops the other (no watchdog needed), the job requeues.
    # Only the stopped rank's allocation has hang events: no other fault waited for a watchdog.
    kill = faults["rank_kill"]
    assert kill.recovered and "crashed with exit" in kill.requeue_cause, why
    assert len({e["restart"] for e in hangs}) == 1, why
    # 2. One rank stopped: the other's watchdog ends the allocation (exit 124, requeued), having
    # waited its whole timeout without progress.
    hang = faults["rank_hang"]
    assert hang.recovered and hang.requeue_cause.startswith("hung (exit 124"), why
    # The rank still running noticed (the stopped one, continued by srun's kill, may say so too).
    noticed = [e for e in hangs if e["rank"] != hang.rank]
    assert noticed and all(e["idle_s"] >= e["allowance_s"] >= HANG_TIMEOUT_S for e in noticed), why
    # its stacks in the job log
    assert "most recent call first" in logs and "HANG: rank" in logs, why
    # 3. A node failed (slurmd and the job's processes on it killed), came back, the job resumed.
    assert faults["node_fail"].recovered, why
    if nodes == 2:
        assert "node n" in faults["node_fail"].note and " of n[1-2]" in faults["node_fail"].note, why
    # 4. A SIGKILL inside a save: the previous checkpoint is the one resumed from.
    kill = faults["save_kill"]
    assert kill.resumed_from < kill.step, why
    # 5. scancel -s TERM: saved at the signal, requeued as the user's; 6. a flipped byte: the
    # damaged checkpoint refused, the one before it resumed from.
    assert faults["scancel_term"].recovered and faults["scancel_term"].requeue_cause == "user", why
    flip = faults["bitflip"]
    assert flip.recovered and flip.resumed_from < flip.step, why
    # One job id all along, requeued once per fault, every allocation appending to one log.
    # (>= 6: SLURM may deliver the failed node's stale kill to the next allocation, one crash more)
    assert {e["job_id"] for e in events} == {s["job_id"]} and s["restarts"] >= 6, why
    assert json.loads(json.dumps(result.to_json()))["summary"]["exact"] is True, why

