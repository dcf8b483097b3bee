"""What the tests share: driving real training processes (start, signal, kill, read what they
wrote), damaging files, comparing losses and optimizer states, and jobs on the local SLURM
cluster. Test files import this module, never each other."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from telepathy.config import load_config
from telepathy.core.jsonl import last_per_step, read_jsonl, wait_for_step
from telepathy.core.paths import RunPaths
from telepathy.slurm import scontrol

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny-cpu.yaml")
LORA_CONFIG = str(ROOT / "configs" / "tiny-lora-cpu.yaml")
# Short runs for tests: 60 steps, a checkpoint every 20.
SETS = ["train.steps=60", "checkpoint.every_steps=20", "train.log_every=20"]
TIMEOUT_S = 300

_seed = int(os.environ.get("TELEPATHY_TEST_SEED", time.time_ns() % 2**31))
print(f"TELEPATHY_TEST_SEED={_seed}", file=sys.stderr)
RNG = random.Random(_seed)


TORCHRUN = ("import gc, sys; gc.disable(); sys.argv[0] = 'torchrun'\n"
            "from torch.distributed.run import main; main()")
"""`python -m torch.distributed.run` as torchrun's own script runs it (its `main`), without
the collector: the launcher allocates little once its ranks run, and its start costs 0.4 s of
CPU less (of ~2.3 s) in every world-2 test run."""


def command(run_dir: Path, world: int = 1, sets: list[str] = (), extra: list[str] = (),
            config: str = CONFIG) -> list[str]:
    launcher = [sys.executable, "-m", "telepathy.resume"]
    if world > 1:  # torchrun (its main), with the cyclic collector off as telepathy's ranks start
        launcher = [sys.executable, "-c", TORCHRUN, "--standalone",
                    f"--nproc_per_node={world}", "-m", "telepathy.resume"]
    cmd = launcher + ["--config", config, "--run-dir", str(run_dir)]
    for s in [*SETS, *sets]:
        cmd += ["--set", s]
    return cmd + list(extra)


def start(run_dir: Path, world: int = 1, sets: list[str] = (), env: dict | None = None,
          extra: list[str] = (), config: str = CONFIG) -> subprocess.Popen:
    run_dir.mkdir(parents=True, exist_ok=True)
    log = open(run_dir.parent / f"{run_dir.name}.log", "ab")
    return subprocess.Popen(command(run_dir, world, sets, extra, config), stdout=log,
                            stderr=subprocess.STDOUT,
                            cwd=ROOT, env={**os.environ, **(env or {})}, start_new_session=True)


def finish(proc: subprocess.Popen) -> int:
    try:
        return proc.wait(TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


def run(run_dir: Path, world: int = 1, sets: list[str] = (), env: dict | None = None,
        extra: list[str] = (), config: str = CONFIG) -> int:
    return finish(start(run_dir, world, sets, env, extra, config))


def interrupt(run_dir: Path, after_step: int, world: int = 1, sets: list[str] = (),
              env: dict | None = None, config: str = CONFIG) -> tuple[int, int]:
    """Start (or resume) a run, send SIGTERM once it logged `after_step`; return (rc, step seen).

    The step waited for is one this process logs itself (past any step already in the file).
    """
    logged = [r["step"] for r in metrics(run_dir)] if run_dir.exists() else []
    after_step = max([after_step, *(s + 1 for s in logged)])
    proc = start(run_dir, world, sets, env, config=config)
    seen = wait_for_step(RunPaths.at(run_dir).metrics, after_step, TIMEOUT_S,
                         lambda: proc.poll() is None)
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to every rank
    return finish(proc), seen


def losses(run_dir: Path) -> dict[int, float]:
    return {s: r["loss"] for s, r in last_per_step(list(read_jsonl(RunPaths.at(run_dir).metrics))).items()}


def metrics(run_dir: Path) -> list[dict]:
    return list(read_jsonl(RunPaths.at(run_dir).metrics))


def events(run_dir: Path, name: str | None = None) -> list[dict]:
    return [e for e in read_jsonl(RunPaths.at(run_dir).events) if name in (None, e.get("event"))]


def log_text(run_dir: Path) -> str:
    return (run_dir.parent / f"{run_dir.name}.log").read_text(errors="replace")


# -- fine-tuning: small pretrained models saved locally, LoRA runs --------------------------------
LORA_SETS = ["train.steps=16", "train.warmup_steps=3", "checkpoint.every_steps=4",
             "train.log_every=4"]
PACED = {"TELEPATHY_FAULT": "step.start@*,sleep=0.1"}
"""Every step sleeps 0.1 s (outside the maths): a signal sent after step N <= 10 has the six
steps left, at least 0.6 s, to arrive before the 16-step run ends."""


def save_base(out: Path, arch: str, tied: bool = False) -> Path:
    """A tiny pretrained model saved with `save_pretrained`, as a user's local directory would
    hold one: GPT-2 (tied embeddings, its default dropout 0.1) or Llama (grouped-query
    attention, untied unless `tied`, as small Llama-family models are); vocabulary 256, 128
    positions."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    if arch == "gpt2":
        config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=128,
                            bos_token_id=0, eos_token_id=0)
    else:
        config = LlamaConfig(hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                             max_position_embeddings=128, bos_token_id=0, eos_token_id=0,
                             tie_word_embeddings=tied)
    torch.manual_seed(7)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


def lora_sets(base: Path, *more: str) -> list[str]:
    return [*LORA_SETS, f"model.pretrained_path={base}", *more]


def safetensors_size(model_dir: Path) -> tuple[int, int]:
    """(tensors, bytes) of the weights in a model directory's safetensors files."""
    from safetensors import safe_open

    tensors = size = 0
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                tensors, size = tensors + 1, size + t.numel() * t.element_size()
    return tensors, size


def consolidated(ckpt: Path) -> dict:
    """DeepSpeed's own zero_to_fp32 consolidation of a checkpoint directory (not telepathy's)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)


# -- what a checkpoint holds, and damaging it ------------------------------------------------------
MODEL, OPTIM = "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"
RANK_STATE, STATE = "telepathy/rank_00000.safetensors", "telepathy/state.json"


def damage(path, how):
    """Flip one random bit, cut the file in half, or delete it."""
    data = bytearray(path.read_bytes())
    if how == "flip":
        at = RNG.randrange(len(data))
        data[at] ^= 0x01 << RNG.randrange(8)
        path.write_bytes(bytes(data))
    elif how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        path.unlink()


# -- comparing runs ------------------------------------------------------------------------------
RTOL = 1e-5


def assert_same_losses(run_dir, reference):
    got = losses(run_dir)
    assert sorted(got) == sorted(reference), "the resumed run did not log every step"
    differ = [(s, reference[s], got[s]) for s in reference if got[s] != reference[s]]
    assert not differ, f"losses differ from the uninterrupted run at (step, ref, got): {differ[:5]}"


def assert_preempted(rc, world, run_dir):
    """The ranks saved and left with the preemption exit (torchrun itself exits 1 after it
    forwarded the signal)."""
    assert rc == (75 if world == 1 else 1), log_text(run_dir)
    assert events(run_dir, "preempted"), log_text(run_dir)


def assert_close_losses(got, ref, exact_until):
    assert sorted(got) == sorted(ref), "the run did not log every step"
    exact = [s for s in ref if s <= exact_until and got[s] != ref[s]]
    assert not exact, f"losses before the first world-size change differ: {exact[:5]}"
    far = [(s, ref[s], got[s]) for s in ref if abs(got[s] - ref[s]) > RTOL * abs(ref[s])]
    assert not far, f"losses differ by more than {RTOL} relative at (step, ref, got): {far[:5]}"


def assert_same_state(saved, loaded):
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    a, b = load_file(saved), load_file(loaded)
    assert sorted(a) == sorted(b) and len(a) > 0
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"optimizer state changed across the world-size change: {differ[:5]}"
    with safe_open(saved, "pt") as f, safe_open(loaded, "pt") as g:
        groups = json.loads(f.metadata()["param_groups"])
        assert json.loads(g.metadata()["param_groups"]) == groups
        steps = json.loads(f.metadata()["adam_steps"])
        assert json.loads(g.metadata()["adam_steps"]) == steps
    assert [grp["weight_decay"] for grp in groups] == [0.1, 0.0]  # not all group 0's
    assert len(steps) == 2 and len(set(steps)) == 1


# -- a telepathy job on the local SLURM cluster ------------------------------------------------------
SCRIPT = str(ROOT / "slurm" / "preemptible.slurm")
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
         "DEADLINE")


class Job:
    """A telepathy job on the local SLURM cluster, submitted with slurm/preemptible.slurm."""

    def __init__(self, cluster, tmp_path, sets=(), gpus=1, sbatch_args=(), env=None, name="run",
                 run_dir=None, job_id=None, config=CONFIG):
        """Submit a job, or (with `job_id`) follow one submitted otherwise with these files."""
        self.cluster = cluster
        self.run_dir = run_dir or tmp_path / name
        self.config = tmp_path / f"{name}.yaml"
        cfg = load_config(config, [*SETS, *sets])
        self.config.write_text(yaml.safe_dump(cfg.to_dict()))
        self.env = {**cluster.env(), "TELEPATHY_CONFIG": str(self.config),
                    "TELEPATHY_RUN_DIR": str(self.run_dir), **(env or {})}
        self.out = tmp_path / f"{name}.out"
        self.err = tmp_path / f"{name}.err"
        self.id = job_id or scontrol.sbatch(
            SCRIPT, [f"--gpus-per-node=h100:{gpus}", f"--output={self.out}", f"--error={self.err}",
                     *sbatch_args], env=self.env, cwd=str(ROOT))

    def state(self):
        return scontrol.job_state(self.id, env=self.cluster.env())

    def wait_step(self, step, timeout=240):
        return wait_for_step(self.run_dir / "metrics.jsonl", step, timeout)

    def wait_restarts(self, restarts, timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state, count = self.state()
            if count >= restarts:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {self.id} did not reach {restarts} restarts: {self.state()}")

    def wait_end(self, timeout=420):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state, restarts = self.state()
            if state in ENDED:
                return state, restarts
            time.sleep(1)
        raise TimeoutError(f"job {self.id} still {self.state()} after {timeout} s\n{self.logs()}")

    def term(self):
        scontrol.scancel(self.id, signal="TERM", env=self.cluster.env())

    def logs(self):
        return (self.out.read_text(errors="replace") if self.out.exists() else "") + \
               (self.err.read_text(errors="replace") if self.err.exists() else "")


# -- instruction tuning ----------------------------------------------------------------------------
SFT_CONFIG = str(ROOT / "configs" / "tiny-sft-cpu.yaml")


def sft_paths(root: Path) -> dict[str, Path]:
    return {"tokenizer": root / "tokenizer", "train": root / "train.ex", "val": root / "val.ex",
            "base": root / "base"}


def make_sft_data(root: Path) -> dict[str, Path]:
    """The toy chats and their ChatML tokenizer (`telepathy data toy`), prepared as chat
    examples, and a tiny pretrained Llama of the tokenizer's vocabulary to fine-tune."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from telepathy.data.cli import main as data_main
    from telepathy.data.toy import make_toy

    paths = sft_paths(root)
    make_toy(root, "chatml", train=240, val=24, seed=3)
    for split in ("train", "val"):
        rc = data_main(["prepare", "--tokenizer", str(paths["tokenizer"]), "--format", "chat",
                        "--quiet", "--out", str(paths[split]), str(root / f"{split}.jsonl")])
        assert rc == 0
    config = LlamaConfig(hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                         max_position_embeddings=128, tie_word_embeddings=True)
    torch.manual_seed(11)
    AutoModelForCausalLM.from_config(config).save_pretrained(paths["base"])
    return paths


def sft_sets(data: dict[str, Path], *more: str) -> list[str]:
    """LoRA on the tiny base, 24 steps, evaluated every 4 (the best kept), saved every 8."""
    return [f"data.path={data['train']}", f"eval.path={data['val']}", "eval.every_steps=4",
            f"model.pretrained_path={data['base']}", "model.lora.r=8", "train.steps=24",
            "train.warmup_steps=3", "checkpoint.every_steps=8", "train.log_every=4", *more]


# -- a module of the user's own ------------------------------------------------------------------
BRIDGE_CONFIG = str(ROOT / "examples" / "bridge" / "bridge-cpu.yaml")
MODULES = ROOT / "tests" / "modules"


def make_bridge_toy(root: Path) -> Path:
    sys.path.insert(0, str(ROOT / "examples" / "bridge"))
    try:
        import make_toy
    finally:
        sys.path.remove(str(ROOT / "examples" / "bridge"))
    make_toy.make(root, pairs=256)
    return root


def bridge_sets(toy: Path, record: Path | None = None, *more: str) -> list[str]:
    """The bridge on the toy models of `toy`, 24 steps saved every 4; with `record`, the sample
    indices each forward receives written under it (tests/modules/recording.py)."""
    toy = Path(toy)
    sets = [f"model.options.source={toy / 'source'}", f"model.options.target={toy / 'target'}",
            f"model.base_paths=[{toy / 'source'}, {toy / 'target'}]",
            f"data.options.path={toy / 'pairs.jsonl'}", f"data.options.source={toy / 'source'}",
            f"data.options.target={toy / 'target'}", "train.steps=24", "train.warmup_steps=3",
            "checkpoint.every_steps=4", "train.log_every=4"]
    if record is not None:
        sets += [f"code_path=[{ROOT / 'examples' / 'bridge'}, {MODULES}]",
                 "model.module=recording:bridge", f"model.options.record={record}"]
    return [*sets, *more]


def bridge_code():
    """examples/bridge's bridge_model and bridge_data modules."""
    sys.path.insert(0, str(ROOT / "examples" / "bridge"))
    try:
        import bridge_data
        import bridge_model
    finally:
        sys.path.remove(str(ROOT / "examples" / "bridge"))
    return bridge_model, bridge_data


def bridge_module(toy: Path, trained: dict):
    """The example's Bridge on the toy models of `toy`, the tensors `trained` loaded."""
    bridge_model, _ = bridge_code()
    model = bridge_model.build({"source": str(toy / "source"), "target": str(toy / "target"),
                                "soft_tokens": 4, "heads": 4})
    missing = set(trained) - set(dict(model.named_parameters()))
    assert not missing, missing
    model.load_state_dict(trained, strict=False)
    return model


def bridge_batch(toy: Path, indices) -> dict:
    """Samples `indices` of the example's dataset on `toy`, stacked."""
    import torch

    _, bridge_data = bridge_code()
    data = bridge_data.pairs({"path": str(toy / "pairs.jsonl"), "source": str(toy / "source"),
                              "target": str(toy / "target"), "source_len": 24,
                              "target_len": 24})
    items = [data[i] for i in indices]
    return {k: torch.stack([item[k] for item in items]) for k in items[0]}


# -- the checkpoint mirror's S3 endpoint -----------------------------------------------------------
class S3Server:
    """moto's standalone S3 server (a real HTTP server, in its own process) on 127.0.0.1 at a free
    port, as s3fs's own tests run it. Clients reach it through the standard variables of `env`
    (AWS_ENDPOINT_URL and the keys), nothing hard-coded in telepathy. `pause()` stops the
    process (SIGSTOP: it keeps its objects and answers nothing: a hung server), `resume()`
    lets it go on."""

    def __init__(self, root: Path):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": "telepathy-tests",
                    "AWS_SECRET_ACCESS_KEY": "telepathy-tests", "AWS_DEFAULT_REGION": "us-east-1"}
        root.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                      str(self.port)], stdout=open(root / "moto.log", "ab"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 60
        while True:
            try:
                self.client().list_buckets()
                break
            except Exception:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.2)
        self.buckets = 0

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id=self.env[
            "AWS_ACCESS_KEY_ID"], aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region_name="us-east-1", config=Config(retries={"max_attempts": 1}))

    def bucket(self) -> str:
        """A new, empty bucket of this server."""
        self.buckets += 1
        name = f"mirror-{os.getpid()}-{self.buckets}"
        self.client().create_bucket(Bucket=name)
        return name

    def read_only_keys(self, bucket: str) -> dict[str, str]:
        """Credentials of a new IAM user of this server allowed to read and list `bucket`, not
        to write it (the server checks them once `authorizing()` is on)."""
        import boto3

        iam = boto3.client("iam", endpoint_url=self.url, region_name="us-east-1",
                           aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                           aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"])
        name = f"reader-{bucket}"
        iam.create_user(UserName=name)
        where = [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]
        iam.put_user_policy(UserName=name, PolicyName="read", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [
                {"Effect": "Allow", "Action": "s3:*", "Resource": where},
                {"Effect": "Deny", "Action": ["s3:PutObject", "s3:DeleteObject"],
                 "Resource": where}]}))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"],
                "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}

    def authorizing(self, on: bool) -> None:
        """Whether the server checks every request's credentials against its IAM users'
        policies (moto's /moto-api/reset-auth; off: anything goes, the default)."""
        import urllib.request

        urllib.request.urlopen(urllib.request.Request(
            f"{self.url}/moto-api/reset-auth", data=b"0" if on else b"inf", method="POST",
            headers={"Content-Type": "text/plain"}),
            timeout=30).read()

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        self.resume()
        self.proc.kill()
        self.proc.wait()


FAST_MIRROR = ('checkpoint.mirror_options={"config_kwargs": {"connect_timeout": 2, '
               '"read_timeout": 2, "retries": {"max_attempts": 1}}}')
"""A client that gives up on a hung server in seconds (s3fs still retries a timeout 5 times):
the default waits up to 2 minutes a request."""


def mirror_objects(client, bucket: str, prefix: str) -> dict[str, bytes]:
    """Every object under `prefix`, read with boto3 (the other tool), by key relative to it."""
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            body = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
            out[item["Key"][len(prefix):].lstrip("/")] = body
    return out


def matches_manifest(data: bytes, entry: dict) -> bool:
    """Whether bytes read from the mirror hash, chunk by chunk, as a manifest entry says."""
    from telepathy.checkpoint.hashing import new_hash

    chunk = entry["chunk_bytes"]
    digests = [new_hash(entry["hash"]) for _ in range(max(1, -(-len(data) // chunk)))]
    for i, digest in enumerate(digests):
        digest.update(data[i * chunk:(i + 1) * chunk])
    return len(data) == entry["size"] and [d.hexdigest() for d in digests] == entry["chunks"]
