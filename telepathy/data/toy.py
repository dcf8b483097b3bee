"""A toy instruction set and small tokenizers with real chat templates, made here, so the
instruction-tuning path runs end to end with nothing downloaded (tests, benchmarks, the README).

`make_tokenizer(dir, style)` trains a byte-level BPE of at most 512 tokens on built-in English
and saves it with the special tokens and the chat template of a model family: `chatml` (the
`<|im_start|>role\\n...<|im_end|>` layout of Qwen and SmolLM2) or `llama3` (Meta's Llama 3
Instruct template: BOS, header ids, "\\n\\n", the content trimmed, `<|eot_id|>`).
`toy_chats(n, seed)` makes chats of skewed lengths (many short, a few long; some with a system
message, some of several turns) whose answers are learnable: sums, words spelled backwards,
lists, and stories.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

STYLES = ("chatml", "llama3")

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
"""ChatML as Qwen2.5 and SmolLM2 have it (without tools), with a default system message."""

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}")
"""Meta-Llama-3-8B-Instruct's template, as its tokenizer_config.json has it."""

_SPECIAL = {
    "chatml": {"tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
               "roles": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
               "template": CHATML_TEMPLATE},
    "llama3": {"tokens": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                          "<|end_header_id|>", "<|eot_id|>"],
               "roles": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
               "template": LLAMA3_TEMPLATE},
}

ANIMALS = ["cat", "dog", "fox", "owl", "bear", "horse", "mouse", "rabbit", "otter", "crow"]
PLACES = ["forest", "river", "garden", "village", "mountain", "library", "harbor", "meadow"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "brown", "silver"]
FRUITS = ["apple", "pear", "plum", "cherry", "lemon", "grape", "peach", "melon"]
SYSTEMS = ["You are a helpful assistant.", "Answer briefly and exactly.",
           "You are a patient teacher who explains things simply."]
ACTIONS = ["found a {color} {fruit} near the {place}", "walked to the {place} at dawn",
           "met {an_animal} who lived by the {place}", "counted {n} {color} stones",
           "sang a song about the {place}", "shared {a_fruit} with a friendly {animal}",
           "slept under a {color} blanket", "lost the way and then found it again"]


def make_tokenizer(out_dir: str | Path, style: str = "chatml", vocab_size: int = 512) -> Path:
    """Train and save a byte-level BPE tokenizer of `style`; `AutoTokenizer` loads `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if style not in STYLES:
        raise ValueError(f"style {style!r}: choose one of {', '.join(STYLES)}")
    spec = _SPECIAL[style]
    if not 256 + len(spec["tokens"]) < vocab_size <= 2**16:
        raise ValueError(f"vocab_size {vocab_size}: a byte-level BPE needs more than "
                         f"{256 + len(spec['tokens'])} tokens (and at most 65536 here)")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=spec["tokens"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    trim = processors.ByteLevel(trim_offsets=False)
    if "bos_token" in spec["roles"]:  # Llama 3 adds BOS to plain text as well
        bos = spec["roles"]["bos_token"]
        bpe.post_processor = processors.Sequence([trim, processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, bpe.token_to_id(bos))])])
    else:
        bpe.post_processor = trim
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, chat_template=spec["template"],
                                        **spec["roles"])
    out_dir = Path(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _corpus() -> list[str]:
    """English the tokenizer learns from: the roles and contents of toy chats of a fixed seed."""
    lines = []
    for chat in toy_chats(400, seed=20261205, long_share=0.3):
        lines += [f"{m['role']}\n{m['content']}" for m in chat["messages"]]
    return lines


def toy_chats(n: int, seed: int = 0, max_turns: int = 3, system_share: float = 0.3,
              long_share: float = 0.08) -> list[dict[str, Any]]:
    """`n` chats, `{"messages": [...]}`, the same for the same arguments."""
    rng = random.Random(seed)
    chats = []
    for _ in range(n):
        messages = []
        if rng.random() < system_share:
            messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
        turns = 1 if rng.random() < 0.6 else rng.randint(1, max_turns)
        for _ in range(turns):
            ask, answer = (_story if rng.random() < long_share else _short)(rng)
            messages += [{"role": "user", "content": ask},
                         {"role": "assistant", "content": answer}]
        chats.append({"messages": messages})
    return chats


def _short(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    if kind == 1:
        word = rng.choice(ANIMALS + FRUITS + COLORS)
        return f"Spell {word} backwards.", f"{word} backwards is {word[::-1]}."
    k = rng.randint(2, 5)
    group, words = rng.choice([("animals", ANIMALS), ("fruits", FRUITS), ("colors", COLORS)])
    return f"Name {k} {group}.", f"Here are {k} {group}: {', '.join(rng.sample(words, k))}."


def _story(rng: random.Random) -> tuple[str, str]:
    """A long answer: a story of 4 to about 60 sentences (most short, a few very long)."""
    animal = rng.choice(ANIMALS)
    sentences = min(60, 3 + int(rng.paretovariate(1.1)))
    parts = [f"Once upon a time {_a(animal)} lived near the {rng.choice(PLACES)}."]
    for _ in range(sentences):
        fruit, other = rng.choice(FRUITS), rng.choice(ANIMALS)
        action = rng.choice(ACTIONS).format(
            color=rng.choice(COLORS), fruit=fruit, a_fruit=_a(fruit), place=rng.choice(PLACES),
            animal=other, an_animal=_a(other), n=rng.randint(2, 9))
        parts.append(f"Then the {animal} {action}.")
    parts.append(f"And the {animal} was happy.")
    return f"Tell me a story about {_a(animal)}.", " ".join(parts)


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """One JSON object a line; returns how many."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def make_toy(out_dir: str | Path, style: str = "chatml", train: int = 2000, val: int = 200,
             seed: int = 0) -> dict[str, Any]:
    """DIR/tokenizer/, DIR/train.jsonl and DIR/val.jsonl (another seed); what was written."""
    out_dir = Path(out_dir)
    make_tokenizer(out_dir / "tokenizer", style)
    rows = {"train": write_jsonl(out_dir / "train.jsonl", toy_chats(train, seed)),
            "val": write_jsonl(out_dir / "val.jsonl", toy_chats(val, seed + 1_000_003))}
    return {"tokenizer": str(out_dir / "tokenizer"), "style": style, **rows,
            "train_path": str(out_dir / "train.jsonl"), "val_path": str(out_dir / "val.jsonl")}
