"""Real text in, a model out: a tokenizer trained here, text prepared with
`telepathy data prepare`, training with a SIGTERM resume (bit for bit), export with the
tokenizer, and generation with plain transformers. Nothing is downloaded: the text is the help
that ships with Python (pydoc_data), the tokenizer a byte-level BPE trained on it."""

import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from telepathy.core.paths import RunPaths
from tests import support
from tests.support import RNG

VOCAB = 512


@pytest.fixture(scope="module")
def texts_and_tokenizer(tmp_path_factory):
    from pydoc_data.topics import topics

    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("text")
    names = sorted(topics)
    files = []
    for i in range(3):  # three documents
        path = root / f"doc{i}.txt"
        path.write_text("\n\n".join(topics[n] for n in names[i::3]))
        files.append(path)
    bpe = ByteLevelBPETokenizer()
    bpe.train([str(f) for f in files], vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
              show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    tokenizer.save_pretrained(root / "tokenizer")
    return files, root / "tokenizer"


def prepare(tokenizer, out, files):
    return subprocess.run([sys.executable, "-m", "telepathy", "data", "prepare", "--tokenizer",
                           str(tokenizer), "--out", str(out), "--quiet", *map(str, files)],
                          capture_output=True, text=True, timeout=300)


SETS = [f"model.vocab_size={VOCAB}", "data.dtype=uint16"]


def test_text_to_tokens_to_a_resumed_run_to_an_export_that_generates(texts_and_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    files, tokenizer_dir = texts_and_tokenizer
    corpus = tmp_path / "data" / "corpus.bin"
    done = prepare(tokenizer_dir, corpus, files)
    assert done.returncode == 0, done.stderr
    meta = json.loads((tmp_path / "data" / "corpus.bin.json").read_text())
    tokens = np.fromfile(corpus, dtype=np.uint16)  # nanoGPT's layout: raw uint16, no header
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == VOCAB and meta["documents"] == 3
    assert meta["tokens"] == len(tokens) > 50_000
    assert meta["sha256"] == hashlib.sha256(corpus.read_bytes()).hexdigest()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    eos = tokenizer.eos_token_id
    expected = [t for f in files for t in tokenizer(f.read_text())["input_ids"] + [eos]]
    assert tokens.tolist() == expected  # EOS after every document, nothing else added

    # The reference reads a bare copy (a file nanoGPT's prepare.py could have written).
    bare = tmp_path / "bare" / "corpus.bin"
    bare.parent.mkdir()
    shutil.copyfile(corpus, bare)
    reference = tmp_path / "reference"
    assert support.run(reference, 1, [*SETS, f"data.path={bare}"]) == 0, support.log_text(reference)
    run_dir = tmp_path / "run"
    sets = [*SETS, f"data.path={corpus}"]
    rc, _ = support.interrupt(run_dir, RNG.randint(5, 50), sets=sets)
    assert rc == 75, support.log_text(run_dir)
    assert support.run(run_dir, 1, sets) == 0, support.log_text(run_dir)
    support.assert_same_losses(run_dir, support.losses(reference))
    state = json.loads((RunPaths.at(run_dir).checkpoint(60) / "telepathy" / "state.json").read_text())
    assert state["data"]["sha256"] == meta["sha256"]  # recorded with every checkpoint

    out = tmp_path / "model"
    exported = subprocess.run([sys.executable, "-m", "telepathy", "export", str(run_dir), "--out",
                               str(out)], capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0, exported.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "telepathy-export.json",
        "tokenizer.json", "tokenizer_config.json"]  # the run's tokenizer, nothing else of it
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert model.config.eos_token_id == tokenizer.eos_token_id == eos  # generation stops there
    assert model.generation_config.eos_token_id == eos
    prompt = tokenizer("The while statement", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 8
    assert tokenizer.decode(generated[0]).startswith("The while statement")


def test_a_token_file_the_model_cannot_hold_or_read_is_refused_before_training(
        texts_and_tokenizer, tmp_path, capsys):
    from telepathy.train.resume import main

    files, tokenizer_dir = texts_and_tokenizer
    corpus = tmp_path / "corpus.bin"
    assert prepare(tokenizer_dir, corpus, files[:1]).returncode == 0
    run = ["--config", support.CONFIG, "--run-dir", str(tmp_path / "run"), "--set",
           f"data.path={corpus}"]
    assert main([*run, "--set", "model.vocab_size=256"]) == 2
    assert "a vocabulary of 512 tokens, but model.vocab_size is 256" in capsys.readouterr().err
    assert main([*run, *[f"--set={s}" for s in [f"model.vocab_size={VOCAB}", "data.dtype=uint32"]]]) == 2
    assert "holds uint16 tokens" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_a_resume_on_other_data_under_the_same_path_is_refused(texts_and_tokenizer, tmp_path):
    files, tokenizer_dir = texts_and_tokenizer
    corpus = tmp_path / "corpus.bin"
    assert prepare(tokenizer_dir, corpus, files[:2]).returncode == 0
    run_dir = tmp_path / "run"
    sets = [*SETS, f"data.path={corpus}", "train.steps=20", "train.warmup_steps=5"]
    assert support.run(run_dir, 1, sets) == 0, support.log_text(run_dir)
    assert prepare(tokenizer_dir, corpus, files[1:]).returncode == 0  # other text, same path
    assert support.run(run_dir, 1, sets) == 2  # the same config: only the data changed
    log = support.log_text(run_dir)
    assert "change the training trajectory: data file content" in log and "train." not in \
        log.split("change the training trajectory:")[1].split("Restore")[0]


def test_prepare_names_what_is_wrong(texts_and_tokenizer, tmp_path):
    files, tokenizer_dir = texts_and_tokenizer
    done = prepare(tmp_path / "nope", tmp_path / "c.bin", files)
    assert done.returncode == 2 and "is not a directory" in done.stderr
    done = prepare(tokenizer_dir, tmp_path / "c.bin", [tmp_path / "missing.txt"])
    assert done.returncode == 2 and "no such text file" in done.stderr
    assert not (tmp_path / "c.bin").exists()


def test_prepare_streams_in_blocks_and_the_tokens_decode_to_the_text(texts_and_tokenizer,
                                                                     tmp_path, monkeypatch):
    """Blocks of ~2,000 characters (one long line cut too): byte-level BPE gives back the text."""
    from transformers import AutoTokenizer

    from telepathy.data import prepare

    files, tokenizer_dir = texts_and_tokenizer
    long_line = tmp_path / "one-line.txt"
    long_line.write_text(" ".join(["a line without an end"] * 400))  # ~8,800 characters
    monkeypatch.setattr(prepare, "BLOCK_CHARS", 2000)
    meta = prepare.prepare(tokenizer_dir, tmp_path / "c.bin", [files[0], long_line], progress=False)
    tokens = np.fromfile(tmp_path / "c.bin", dtype=np.uint16).tolist()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    eos = tokenizer.eos_token_id
    assert meta["tokens"] == len(tokens) and [i for i, t in enumerate(tokens) if t == eos] == [
        tokens.index(eos), len(tokens) - 1]
    first, second = tokens.index(eos), len(tokens) - 1
    assert tokenizer.decode(tokens[:first]) == files[0].read_text()
    assert tokenizer.decode(tokens[first + 1:second]) == long_line.read_text()


def test_prepare_refuses_an_eos_outside_the_vocabulary_and_its_own_input(texts_and_tokenizer,
                                                                         tmp_path):
    files, tokenizer_dir = texts_and_tokenizer
    done = subprocess.run([sys.executable, "-m", "telepathy", "data", "prepare", "--tokenizer",
                           str(tokenizer_dir), "--out", str(tmp_path / "c.bin"), "--eos-id", "70000",
                           str(files[0])], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--eos-id 70000 is not a token of the tokenizer" in done.stderr
    done = prepare(tokenizer_dir, files[0], files)
    assert done.returncode == 2 and "is one of the text files" in done.stderr
    done = prepare(tokenizer_dir, tmp_path / "c.npy", files)
    assert done.returncode == 2 and "name it .bin" in done.stderr


def test_a_token_file_changed_since_it_was_prepared_is_refused(texts_and_tokenizer, tmp_path,
                                                                capsys):
    from telepathy.train.resume import main

    files, tokenizer_dir = texts_and_tokenizer
    corpus = tmp_path / "corpus.bin"
    assert prepare(tokenizer_dir, corpus, files[:1]).returncode == 0
    with open(corpus, "r+b") as f:
        f.truncate(corpus.stat().st_size - 2)  # one token less
    assert main(["--config", support.CONFIG, "--run-dir", str(tmp_path / "run"),
                 *[f"--set={s}" for s in [*SETS, f"data.path={corpus}"]]]) == 2
    assert "the file changed since it was prepared" in capsys.readouterr().err
