"""One example of instruction data into token ids and a loss mask (1: predicting this token
counts), through the tokenizer's own chat template.

Chats (`{"messages": [...]}`): the loss counts the assistant turns, their content and the
end-of-turn token the template writes after it, every assistant turn of the chat. A template
with `{% generation %}` markers says where they are itself (transformers'
`return_assistant_tokens_mask`). Any other template is read by prefix difference on the
rendered text: for assistant message i, P = the chat before it with the generation prompt, Q =
the chat up to it; Q must begin with P and the whole rendering with Q (else the template is not
prefix-consistent, and is refused). The answer is characters [len(P), len(Q)) without trailing
whitespace (ChatML's "\\n" after `<|im_end|>` does not count, `<|im_end|>` does); a token counts
when it holds a character of an answer (the rendering tokenized with its offsets, as
`apply_chat_template` tokenizes it: no special tokens added).

Prompt-completion rows follow TRL's SFTTrainer: strings are tokenized as prompt + completion +
EOS with the tokenizer's usual special tokens (BOS, if it adds one), the loss counting the
completion and the EOS; message lists are rendered whole, and everything after the rendering of
the prompt with the generation prompt counts.
"""

from __future__ import annotations

import bisect
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import DataError

FORMATS = ("chat", "prompt-completion")
SHAPES = {"chat": '{"messages": [{"role": "user", "content": "..."}, '
                  '{"role": "assistant", "content": "..."}]}',
          "prompt-completion": '{"prompt": "...", "completion": "..."}'}
"""A valid row of each format, for the errors that need one."""
ROLES = ("system", "developer", "user", "assistant", "tool")
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
FIX_TEMPLATE = ("supply a template with {% generation %} markers around the assistant's turns "
                "via --chat-template FILE")

Encoded = tuple[list[int], list[int]]
"""Token ids and their loss mask."""


@dataclass(frozen=True)
class Template:
    text: str
    sha256: str
    marked: bool
    """It has `{% generation %}` markers: transformers finds the assistant tokens itself."""


def resolve_template(tokenizer: Any, path: str | Path | None, tokenizer_dir: str | Path,
                     required: bool) -> Template | None:
    """The template of `--chat-template FILE`, else the tokenizer's own; None (or refused, when
    `required`) when there is neither."""
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"--chat-template {str(path)!r} could not be read ({exc}); give a "
                            "Jinja chat template file") from None
    else:
        try:
            text = tokenizer.get_chat_template()
        except ValueError:
            text = None
    if not text:
        if required:
            raise DataError(f"the tokenizer in {tokenizer_dir} has no chat template; supply "
                            "one with --chat-template FILE (a Jinja file, e.g. the "
                            "chat_template.jinja of a model of its family)")
        return None
    return Template(text, hashlib.sha256(text.encode()).hexdigest(),
                    bool(GENERATION_TAG.search(text)))


def check_messages(messages: Any, key: str) -> list[dict[str, Any]]:
    """`messages` is a non-empty list of {"role": one of ROLES, "content": str}."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f'"{key}" is {_kind(messages)}, not a list of messages; give '
                        '[{"role": "user", "content": "..."}, ...]')
    for n, message in enumerate(messages, 1):
        where = f'"{key}" message {n}'
        if not isinstance(message, dict):
            raise DataError(f'{where} is {_kind(message)}; a message is '
                            '{"role": "user", "content": "..."}')
        for field in ("role", "content"):
            if message.get(field) is None:
                hint = " (ShareGPT's from/value: rename them)" if "from" in message else ""
                raise DataError(f'{where} has no "{field}" (keys: {", ".join(message) or "none"})'
                                f'; every message needs "role" and "content"{hint}')
        if message["role"] not in ROLES:
            raise DataError(f'{where} has role {message["role"]!r}; the roles are '
                            f'{", ".join(ROLES)}')
        if not isinstance(message["content"], str):
            raise DataError(f'{where} has content of type {_kind(message["content"])}; content '
                            'must be a string (text only)')
    return messages


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


class Encoder:
    """Token ids and loss masks of chats and prompt-completion rows, with one tokenizer."""

    def __init__(self, tokenizer: Any, template: Template | None, train_on_prompt: bool):
        self.tokenizer = tokenizer
        self.template = template
        self.train_on_prompt = train_on_prompt
        self.used_template = False
        """Whether a row was rendered with the template (string prompt-completion rows are not)."""

    def example(self, fmt: str, row: dict[str, Any]) -> Encoded:
        """A row of `fmt` (checked first: what is wrong with it, and the fix)."""
        keys = ", ".join(row) or "none"
        if fmt == "chat":
            if "messages" not in row:
                hint = "; for prompt/completion rows use --format prompt-completion" \
                    if "prompt" in row else ""
                raise DataError(f'no "messages" key (keys: {keys}); a chat row is '
                                f'{SHAPES["chat"]}{hint}')
            return self.chat(check_messages(row["messages"], "messages"))
        for key in ("prompt", "completion"):
            if row.get(key) is None:
                raise DataError(f'no "{key}" (keys: {keys}); a prompt-completion row is '
                                f'{SHAPES[fmt]} (strings, or both lists of messages)')
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            return self.prompt_completion(prompt, completion)
        if isinstance(prompt, list) and isinstance(completion, list):
            return self.prompt_completion(check_messages(prompt, "prompt"),
                                          check_messages(completion, "completion"))
        raise DataError(f'"prompt" is {_kind(prompt)} and "completion" {_kind(completion)}; '
                        "give both as strings, or both as lists of messages")

    def chat(self, messages: list[dict[str, Any]]) -> Encoded:
        if not any(m["role"] == "assistant" for m in messages) and not self.train_on_prompt:
            raise DataError("the chat has no assistant message, so nothing in it would count in "
                            "the loss; add the assistant's answer, drop the line, or pass "
                            "--train-on-prompt to train on every token")
        if self._require_template().marked:
            out = self._apply(messages, tokenize=True, return_dict=True,
                              return_assistant_tokens_mask=True)
            return self._finish(list(out["input_ids"]), list(out["assistant_masks"]))
        text, spans = self.answer_spans(messages)
        return self._finish(*self.tokens_in(text, spans, special_tokens=False))

    def prompt_completion(self, prompt: str | list, completion: str | list) -> Encoded:
        if isinstance(prompt, str):
            eos = self.tokenizer.eos_token
            if eos is None:
                raise DataError("the tokenizer has no EOS token to end the completion with; use "
                                "one that has (its eos_token)")
            text = prompt + completion + ("" if completion.endswith(eos) else eos)
            return self._finish(*self.tokens_in(text, [(len(prompt), len(text))], True))
        self._require_template()
        before = self.render(prompt, add_generation_prompt=True)
        text = self.render(prompt + completion, add_generation_prompt=False)
        if not text.startswith(before):
            raise DataError("the chat template is not prefix-consistent: the prompt rendered "
                            "with the generation prompt does not begin the rendering of prompt "
                            f"+ completion, so the completion cannot be found; {FIX_TEMPLATE}")
        return self._finish(*self.tokens_in(text, [(len(before), len(text))], False))

    def answer_spans(self, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
        """The whole rendering, and the characters of each assistant turn in it."""
        full = self.render(messages, add_generation_prompt=False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            if i == 0:
                raise DataError("the chat begins with an assistant message, so no prompt "
                                f"precedes it; put a user message first, or {FIX_TEMPLATE}")
            before = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[:i + 1], add_generation_prompt=False)
            if not (upto.startswith(before) and full.startswith(upto)):
                raise DataError("the chat template is not prefix-consistent: the rendering of "
                                f"the chat up to message {i + 1} (an assistant's) does not "
                                "continue the rendering before it, or does not begin the whole "
                                f"chat's, so its answer cannot be found; {FIX_TEMPLATE}")
            spans.append((len(before), max(len(before), len(upto.rstrip()))))
        return full, spans

    def tokens_in(self, text: str, spans: list[tuple[int, int]],
                  special_tokens: bool) -> Encoded:
        """`text` tokenized; a token counts when it holds a character of one of `spans`
        (sorted, not overlapping): also a token that begins in the prompt and runs into the
        answer (a generation prompt ending in a space that BPE joins to the answer's first word)."""
        enc = self.tokenizer(text, add_special_tokens=special_tokens,
                             return_offsets_mapping=True)
        starts = [a for a, _ in spans]
        mask = []
        for begin, end in enc["offset_mapping"]:
            k = bisect.bisect_right(starts, begin) - 1
            inside = k >= 0 and begin < spans[k][1]
            into_next = k + 1 < len(spans) and end > spans[k + 1][0] and end > begin
            mask.append(int(inside or into_next))
        return list(enc["input_ids"]), mask

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        return self._apply(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _apply(self, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
        from jinja2 import TemplateError

        self.used_template = True
        try:
            return self.tokenizer.apply_chat_template(messages, chat_template=self.template.text,
                                                      **kwargs)
        except (TemplateError, ValueError, TypeError) as exc:
            raise DataError(f"the chat template refused this chat ({exc}); fix the row, or "
                            "supply another template with --chat-template FILE") from None

    def _require_template(self) -> Template:
        if self.template is None:
            raise DataError("a row of messages needs a chat template and the tokenizer has "
                            "none; supply one with --chat-template FILE (a Jinja file)")
        return self.template

    def _finish(self, ids: list[int], mask: list[int]) -> Encoded:
        if self.train_on_prompt:
            mask = [1] * len(ids)
        if not any(mask[1:]):
            raise DataError("no token of this example counts in the loss (an empty answer, or "
                            "a template that marks no assistant tokens); fix or drop the row")
        return ids, mask
