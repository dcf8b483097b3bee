"""Instruction data through `telepathy data prepare --format chat|prompt-completion`: the loss
masks token by token against hand-rendered chats (ChatML and Llama 3 templates, a template with
`{% generation %}` markers, TRL's prompt-completion rules), bad rows refused with their file and
line and nothing written, --max-len and --drop-long counted, and Parquet and `datasets`
directories giving the file the JSON Lines give. In process, on tokenizers made here (`toy`);
a few seconds in all."""

import hashlib
import json
import shutil

import numpy as np
import pytest

from telepathy.data import chat, sidecar, toy
from telepathy.data.cli import main
from telepathy.data.exfile import FORMAT, Examples, read_header

CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "2 plus 3 is 5."},
        {"role": "user", "content": "Spell cat backwards."},
        {"role": "assistant", "content": "cat backwards is tac."}]

# The chat above, rendered by hand: (text, whether its tokens count in the loss).
PIECES = {
    "chatml": [("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 plus 3?"
                "<|im_end|>\n<|im_start|>assistant\n", 0),
               ("2 plus 3 is 5.<|im_end|>", 1),
               ("\n<|im_start|>user\nSpell cat backwards.<|im_end|>\n<|im_start|>assistant\n", 0),
               ("cat backwards is tac.<|im_end|>", 1),
               ("\n", 0)],
    "llama3": [("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief."
                "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2 plus 3?"
                "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", 0),
               ("2 plus 3 is 5.<|eot_id|>", 1),
               ("<|start_header_id|>user<|end_header_id|>\n\nSpell cat backwards.<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n", 0),
               ("cat backwards is tac.<|eot_id|>", 1)],
}

MARKED_CHATML = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- if message['role'] == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
"""ChatML with `{% generation %}` markers around each answer and its <|im_end|>."""


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("tokenizers")
    dirs = {style: toy.make_tokenizer(root / style, style) for style in toy.STYLES}
    bare = shutil.copytree(dirs["chatml"], root / "no-template")
    (bare / "chat_template.jinja").unlink()
    dirs["none"] = bare
    return {name: (d, AutoTokenizer.from_pretrained(str(d), local_files_only=True))
            for name, d in dirs.items()}


def prepare(tokenizer_dir, out, inputs, fmt="chat", *flags):
    return main(["prepare", "--tokenizer", str(tokenizer_dir), "--format", fmt, "--out",
                 str(out), "--quiet", *flags, *map(str, inputs)])


def made(out):
    """The examples file's examples as (ids, mask) lists, and its sidecar."""
    ex = Examples(out)
    return [(ex.tokens(i).tolist(), ex.mask(i).tolist()) for i in range(len(ex))], \
        json.loads(sidecar.sidecar_path(out).read_text())


def by_hand(tokenizer, pieces):
    ids, mask = [], []
    for text, counts in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [counts] * len(piece)
    mask[0] = 0
    return ids, mask


@pytest.mark.parametrize("style", toy.STYLES)
def test_chat_masks_count_exactly_the_assistant_turns_and_their_end_of_turn(
        tokenizers, style, tmp_path):
    tokenizer_dir, tokenizer = tokenizers[style]
    toy.write_jsonl(tmp_path / "chats.jsonl", [{"messages": CHAT}])
    assert prepare(tokenizer_dir, tmp_path / "out.st", [tmp_path / "chats.jsonl"]) == 0
    [(ids, mask)], meta = made(tmp_path / "out.st")
    assert (ids, mask) == by_hand(tokenizer, PIECES[style])
    # The ids are those apply_chat_template gives; the counted tokens are the answers.
    assert ids == tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    answers = [t for t, counts in PIECES[style] if counts]
    assert tokenizer.decode([i for i, m in zip(ids, mask) if m]) == "".join(answers)
    assert meta["loss_tokens"] == sum(mask) and meta["example_format"] == "chat"
    assert meta["chat_template_sha256"] == chat.resolve_template(
        tokenizer, None, tokenizer_dir, True).sha256


@pytest.mark.parametrize("style", toy.STYLES)
def test_special_tokens_get_their_own_offsets(tokenizers, style):
    _, tokenizer = tokenizers[style]
    text = tokenizer.apply_chat_template(CHAT, tokenize=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    special = set(tokenizer.all_special_ids) | {tokenizer.convert_tokens_to_ids(t) for t in
                                                ("<|im_start|>", "<|start_header_id|>",
                                                 "<|end_header_id|>") if t in tokenizer.vocab}
    seen = 0
    for token, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
        if token in special:
            assert text[a:b] == tokenizer.convert_ids_to_tokens(token)
            seen += 1
    assert seen >= 10


def test_a_template_with_generation_markers_masks_as_the_prefix_difference_does(
        tokenizers, tmp_path):
    tokenizer_dir, tokenizer = tokenizers["chatml"]
    template = tmp_path / "marked.jinja"
    template.write_text(MARKED_CHATML)
    rows = [{"messages": CHAT}, {"messages": CHAT[1:]}, *toy.toy_chats(20, seed=3)]
    toy.write_jsonl(tmp_path / "chats.jsonl", rows)
    assert prepare(tokenizer_dir, tmp_path / "plain.st", [tmp_path / "chats.jsonl"]) == 0
    assert prepare(tokenizer_dir, tmp_path / "marked.st", [tmp_path / "chats.jsonl"],
                   "chat", "--chat-template", str(template)) == 0
    plain, _ = made(tmp_path / "plain.st")
    marked, meta = made(tmp_path / "marked.st")
    assert marked == plain and plain[0] == by_hand(tokenizer, PIECES["chatml"])
    assert meta["chat_template_sha256"] == hashlib.sha256(MARKED_CHATML.encode()).hexdigest()


def test_train_on_prompt_counts_every_token(tokenizers, tmp_path):
    tokenizer_dir, _ = tokenizers["llama3"]
    toy.write_jsonl(tmp_path / "chats.jsonl", [{"messages": CHAT}, {"messages": CHAT[:2]}])
    assert prepare(tokenizer_dir, tmp_path / "out.st", [tmp_path / "chats.jsonl"], "chat",
                   "--train-on-prompt") == 0
    examples, meta = made(tmp_path / "out.st")
    assert [mask for _, mask in examples] == [[0] + [1] * (len(ids) - 1) for ids, _ in examples]
    assert meta["train_on_prompt"] is True and meta["loss_tokens"] == meta["tokens"] - 2


def trl_mask(prompt_ids, ids):
    """TRL SFTTrainer's completion mask: every token after the prompt's."""
    assert ids[:len(prompt_ids)] == prompt_ids
    return [0] * len(prompt_ids) + [1] * (len(ids) - len(prompt_ids))


@pytest.mark.parametrize("style", toy.STYLES)
def test_prompt_completion_strings_count_the_completion_and_eos_as_trl_does(
        tokenizers, style, tmp_path):
    tokenizer_dir, tokenizer = tokenizers[style]
    eos = tokenizer.eos_token
    rows = [{"prompt": "What is 2 plus 3?", "completion": " 5."},
            {"prompt": "Spell cat backwards:", "completion": f" tac.{eos}"}]  # EOS not doubled
    toy.write_jsonl(tmp_path / "pc.jsonl", rows)
    assert prepare(tokenizer_dir, tmp_path / "out.st", [tmp_path / "pc.jsonl"],
                   "prompt-completion") == 0
    examples, meta = made(tmp_path / "out.st")
    for row, (ids, mask) in zip(rows, examples):
        text = row["prompt"] + row["completion"].removesuffix(eos) + eos
        expected = tokenizer(text)["input_ids"]  # BOS where the tokenizer adds one (Llama 3)
        assert ids == expected and ids[-1] == tokenizer.eos_token_id
        assert (ids[0] == tokenizer.bos_token_id) == (style == "llama3")
        want = trl_mask(tokenizer(row["prompt"])["input_ids"], expected)
        want[0] = 0
        assert mask == want
    assert meta["chat_template_sha256"] is None and meta["example_format"] == "prompt-completion"


@pytest.mark.parametrize("style", toy.STYLES)
def test_prompt_completion_messages_count_what_follows_the_prompt_as_trl_does(
        tokenizers, style, tmp_path):
    tokenizer_dir, tokenizer = tokenizers[style]
    row = {"prompt": CHAT[:4], "completion": CHAT[4:]}
    toy.write_jsonl(tmp_path / "pc.jsonl", [row])
    assert prepare(tokenizer_dir, tmp_path / "out.st", [tmp_path / "pc.jsonl"],
                   "prompt-completion") == 0
    [(ids, mask)], meta = made(tmp_path / "out.st")
    whole = tokenizer.apply_chat_template(CHAT, return_dict=True)["input_ids"]
    prompt = tokenizer.apply_chat_template(CHAT[:4], add_generation_prompt=True,
                                           return_dict=True)["input_ids"]
    assert ids == whole and mask == trl_mask(prompt, whole)
    counted = tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert counted == {"chatml": "cat backwards is tac.<|im_end|>\n",
                       "llama3": "cat backwards is tac.<|eot_id|>"}[style]
    assert meta["chat_template_sha256"] is not None


GOOD = json.dumps({"messages": CHAT})


@pytest.mark.parametrize("fmt, line, says", [
    ("chat", '{"messages": [', ["not JSON", "each line must be one JSON object"]),
    ("chat", "[1, 2]", ["not an object", "each line must be one JSON object"]),
    ("chat", json.dumps({"messages": [{"content": "hi"}]}),
     ['message 1 has no "role"', 'every message needs "role" and "content"']),
    ("chat", json.dumps({"messages": [{"role": "asistant", "content": "hi"}]}),
     ["role 'asistant'", "the roles are system, developer, user, assistant, tool"]),
    ("chat", json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
     ["no assistant message", "--train-on-prompt"]),
    ("chat", json.dumps({"prompt": "a", "completion": "b"}),
     ['no "messages" key', "use --format prompt-completion"]),
    ("prompt-completion", json.dumps({"prompt": "hi"}),
     ['no "completion"', '{"prompt": "...", "completion": "..."}']),
    ("prompt-completion", json.dumps({"prompt": "hi", "completion": [CHAT[2]]}),
     ["both as strings, or both as lists of messages"]),
], ids=["not-json", "not-object", "no-role", "unknown-role", "no-assistant", "wrong-format",
        "no-completion", "mixed"])
def test_a_bad_line_is_refused_with_its_file_line_and_fix_and_nothing_is_written(
        tokenizers, tmp_path, capsys, fmt, line, says):
    first = GOOD if fmt == "chat" else json.dumps({"prompt": "a", "completion": "b"})
    data = tmp_path / "rows.jsonl"
    data.write_text(f"{first}\n{line}\n{first}\n")
    out = tmp_path / "out.st"
    assert prepare(tokenizers["chatml"][0], out, [data], fmt) == 2
    err = capsys.readouterr().err
    assert f"{data}:2: " in err and all(s in err for s in says), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]  # no file, no temp


def test_a_refused_run_leaves_an_older_file_and_its_sidecar_as_they_were(tokenizers, tmp_path):
    tokenizer_dir, _ = tokenizers["chatml"]
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    toy.write_jsonl(good, toy.toy_chats(5, seed=1))
    bad.write_text(GOOD + "\nnot json\n")
    out = tmp_path / "out.st"
    assert prepare(tokenizer_dir, out, [good]) == 0
    before = out.read_bytes(), sidecar.sidecar_path(out).read_bytes()
    assert prepare(tokenizer_dir, out, [bad]) == 2
    assert (out.read_bytes(), sidecar.sidecar_path(out).read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bad.jsonl", "good.jsonl", "out.st", "out.st.json"]


def test_a_crash_before_the_sidecar_leaves_no_old_sidecar_beside_new_examples(
        tokenizers, tmp_path, monkeypatch):
    from telepathy.data import prepare as module

    tokenizer_dir, _ = tokenizers["chatml"]
    toy.write_jsonl(tmp_path / "a.jsonl", toy.toy_chats(3, seed=1))
    toy.write_jsonl(tmp_path / "b.jsonl", toy.toy_chats(4, seed=2))
    out = tmp_path / "out.st"
    assert prepare(tokenizer_dir, out, [tmp_path / "a.jsonl"]) == 0

    def disk_full(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(module, "write_atomic", disk_full)
    assert prepare(tokenizer_dir, out, [tmp_path / "b.jsonl"]) == 1
    assert len(Examples(out)) == 4 and not sidecar.sidecar_path(out).exists()


def test_an_unknown_format_is_refused_with_the_valid_ones(tokenizers, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        prepare(tokenizers["chatml"][0], tmp_path / "out.st", [tmp_path / "x.jsonl"], "sharegpt")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'sharegpt'" in err and "'chat'" in err and "'prompt-completion'" in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("flags, says", [
    (["--format", "text", "--max-len", "9"], "--max-len: for --format chat or prompt-completion"),
    (["--format", "chat", "--eos-id", "2"], "--eos-id: for --format text"),
    (["--format", "chat", "--drop-long"], "--drop-long needs --max-len N")])
def test_flags_of_another_format_are_refused(tokenizers, tmp_path, capsys, flags, says):
    with pytest.raises(SystemExit) as exit_:
        main(["prepare", "--tokenizer", str(tokenizers["chatml"][0]), "--out",
              str(tmp_path / "out"), *flags, str(tmp_path / "x.jsonl")])
    assert exit_.value.code == 2 and says in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_template_that_is_not_prefix_consistent_is_refused(tokenizers, tmp_path, capsys):
    template = tmp_path / "closing.jinja"  # a closing token after the last message only
    template.write_text(toy.CHATML_TEMPLATE + "{%- if not add_generation_prompt %}"
                                              "{{- '<|endoftext|>' }}{%- endif %}")
    toy.write_jsonl(tmp_path / "chats.jsonl", [{"messages": CHAT[1:3]}, {"messages": CHAT}])
    out = tmp_path / "out.st"
    assert prepare(tokenizers["chatml"][0], out, [tmp_path / "chats.jsonl"], "chat",
                   "--chat-template", str(template)) == 2  # the first chat, one turn, passes
    err = capsys.readouterr().err
    assert f"{tmp_path / 'chats.jsonl'}:2: the chat template is not prefix-consistent" in err
    assert "{% generation %} markers" in err and "--chat-template FILE" in err
    assert not out.exists() and not sidecar.sidecar_path(out).exists()


def test_a_tokenizer_without_a_template_is_refused_until_one_is_given(tokenizers, tmp_path,
                                                                       capsys):
    bare, tokenizer = tokenizers["none"]
    assert tokenizer.chat_template is None
    toy.write_jsonl(tmp_path / "chats.jsonl", [{"messages": CHAT}])
    out = tmp_path / "out.st"
    assert prepare(bare, out, [tmp_path / "chats.jsonl"]) == 2
    assert "has no chat template; supply one with --chat-template FILE" in capsys.readouterr().err
    assert not out.exists() and not sidecar.sidecar_path(out).exists()
    template = tmp_path / "chatml.jinja"
    template.write_text(toy.CHATML_TEMPLATE)
    assert prepare(bare, out, [tmp_path / "chats.jsonl"], "chat", "--chat-template",
                   str(template)) == 0
    assert made(out)[0][0] == by_hand(tokenizers["chatml"][1], PIECES["chatml"])
    # String prompt-completion rows need no template.
    toy.write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "a", "completion": "b"}])
    assert prepare(bare, tmp_path / "pc.st", [tmp_path / "pc.jsonl"], "prompt-completion") == 0


def test_max_len_cuts_or_drops_long_examples_and_counts_them(tokenizers, tmp_path):
    tokenizer_dir, _ = tokenizers["chatml"]
    data = tmp_path / "chats.jsonl"
    story = toy.toy_chats(1, seed=11, long_share=1.0)[0]["messages"][1]["content"]
    long_question = {"messages": [{"role": "user", "content": " ".join([story] * 10)},
                                  {"role": "assistant", "content": "A story."}]}
    toy.write_jsonl(data, [*toy.toy_chats(60, seed=5, long_share=0.3), long_question])
    assert prepare(tokenizer_dir, tmp_path / "all.st", [data]) == 0
    whole, meta = made(tmp_path / "all.st")
    limit = int(np.percentile([len(ids) for ids, _ in whole], 70))
    long = [(ids, mask) for ids, mask in whole if len(ids) > limit]
    cut = [e for e in long if any(e[1][1:limit])]  # else nothing to learn is left: dropped
    assert meta["truncated"] == meta["dropped"] == 0 and len(long) >= 10
    assert cut and len(cut) < len(long)

    assert prepare(tokenizer_dir, tmp_path / "cut.st", [data], "chat", "--max-len",
                   str(limit)) == 0
    kept, meta = made(tmp_path / "cut.st")
    assert (meta["truncated"], meta["dropped"], meta["max_len"]) == (
        len(cut), len(long) - len(cut), limit)
    assert kept == [(ids[:limit], mask[:limit]) for ids, mask in whole
                    if len(ids) <= limit or any(mask[1:limit])]

    assert prepare(tokenizer_dir, tmp_path / "drop.st", [data], "chat", "--max-len",
                   str(limit), "--drop-long") == 0
    kept, meta = made(tmp_path / "drop.st")
    assert (meta["truncated"], meta["dropped"]) == (0, len(long))
    assert kept == [e for e in whole if len(e[0]) <= limit]


def test_parquet_and_a_saved_dataset_give_the_file_the_json_lines_give(tokenizers, tmp_path):
    datasets = pytest.importorskip("datasets")
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow

    tokenizer_dir, _ = tokenizers["llama3"]
    rows = toy.toy_chats(30, seed=7)
    toy.write_jsonl(tmp_path / "chats.jsonl", rows)
    pq.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "chats.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    metas = []
    for name in ("chats.jsonl", "chats.parquet", "saved"):
        assert prepare(tokenizer_dir, tmp_path / f"{name}.st", [tmp_path / name]) == 0
        metas.append(made(tmp_path / f"{name}.st"))
    assert metas[0][0] == metas[1][0] == metas[2][0]
    assert len({m["sha256"] for _, m in metas}) == 1 and metas[0][1]["examples"] == 30
    _, data_begins = read_header(tmp_path / "chats.jsonl.st")  # the sha256 of all the arrays
    data = (tmp_path / "chats.jsonl.st").read_bytes()[data_begins:]
    assert metas[0][1]["sha256"] == hashlib.sha256(data).hexdigest()


def test_a_bad_parquet_row_is_refused_with_its_row_number(tokenizers, tmp_path, capsys):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow

    rows = [{"messages": CHAT}, {"messages": CHAT[:2]}]  # the second has no answer
    pq.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "chats.parquet")
    assert prepare(tokenizers["chatml"][0], tmp_path / "out.st", [tmp_path / "chats.parquet"]) == 2
    assert f"{tmp_path / 'chats.parquet'} row 2: the chat has no assistant message" in \
        capsys.readouterr().err
    assert not (tmp_path / "out.st").exists()


def test_a_missing_parquet_library_is_refused_with_the_pip_command(tokenizers, tmp_path, capsys,
                                                                   monkeypatch):
    (tmp_path / "chats.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(__import__("sys").modules, "pyarrow.parquet", None)
    assert prepare(tokenizers["chatml"][0], tmp_path / "out.st", [tmp_path / "chats.parquet"]) == 2
    err = capsys.readouterr().err
    assert "needs pyarrow, which is not installed" in err
    assert "pip install 'telepathy[datasets]'" in err and not (tmp_path / "out.st").exists()


def test_the_sidecar_of_examples_is_read_and_checked_for_the_vocabulary_only(tokenizers,
                                                                             tmp_path):
    from telepathy.config.loader import config_from_dict
    from telepathy.core.errors import DataError

    toy.write_jsonl(tmp_path / "chats.jsonl", toy.toy_chats(3, seed=2))
    out = tmp_path / "out.st"
    assert prepare(tokenizers["chatml"][0], out, [tmp_path / "chats.jsonl"]) == 0
    meta = sidecar.read(out)
    assert meta["format"] == FORMAT and meta == {**Examples(out).meta, "sha256": meta["sha256"]}
    assert {"example_format", "dtype", "vocab_size", "eos_token_id", "pad_token_id", "tokenizer",
            "tokenizer_dir", "tokenizer_sha256", "chat_template_sha256", "train_on_prompt",
            "max_len", "truncated", "dropped", "sources", "seconds", "format", "tokens",
            "examples", "loss_tokens", "sha256"} <= set(meta)
    # The file is not raw tokens and data.dtype does not read it: neither is checked.
    sidecar.check(config_from_dict({}, [f"data.path={out}", "data.dtype=uint32",
                                        "model.vocab_size=512"]), meta)
    with pytest.raises(DataError, match="a vocabulary of 512 tokens, but model.vocab_size is 256"):
        sidecar.check(config_from_dict({}, [f"data.path={out}", "model.vocab_size=256"]), meta)


def test_toy_data_is_deterministic_and_skewed(tokenizers, tmp_path, capsys):
    from transformers import AutoTokenizer

    assert toy.toy_chats(50, seed=4) == toy.toy_chats(50, seed=4) != toy.toy_chats(50, seed=5)
    chats = toy.toy_chats(400, seed=4)
    sizes = sorted(sum(len(m["content"]) for m in c["messages"]) for c in chats)
    assert sizes[-1] > 10 * sizes[len(sizes) // 2]  # a few long, many short
    assert any(c["messages"][0]["role"] == "system" for c in chats)
    assert any(sum(m["role"] == "assistant" for m in c["messages"]) > 1 for c in chats)
    assert main(["toy", "--out", str(tmp_path / "toy"), "--train", "20", "--val", "5"]) == 0
    assert (tmp_path / "toy" / "tokenizer" / "tokenizer.json").read_bytes() == (
        tokenizers["chatml"][0] / "tokenizer.json").read_bytes()
    assert [len((tmp_path / "toy" / f).read_text().splitlines()) for f in
            ("train.jsonl", "val.jsonl")] == [20, 5]
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "toy" / "tokenizer"),
                                              local_files_only=True)
    assert len(tokenizer) <= 512 and tokenizer.chat_template == toy.CHATML_TEMPLATE


def test_an_answer_whose_first_token_begins_in_the_generation_prompt_counts_it(tokenizers,
                                                                               tmp_path):
    """A plain template whose generation prompt ends in a space: byte-level BPE joins that space
    to the answer's first word, and that token is the first of the answer."""
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                        "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    tokenizer = tokenizers["chatml"][1]
    toy.write_jsonl(tmp_path / "chats.jsonl", [{"messages": CHAT[1:3]}])
    out = tmp_path / "out.ex"
    assert prepare(tokenizers["chatml"][0], out, [tmp_path / "chats.jsonl"], "chat",
                   "--chat-template", str(template)) == 0
    (ids, mask), = made(out)[0]
    answer = CHAT[2]["content"]
    joined = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
    assert ids[-len(joined) - 1:-1] == joined  # " First" is one token, begun in the prompt
    assert [i for i, m in zip(ids, mask) if m] == joined
