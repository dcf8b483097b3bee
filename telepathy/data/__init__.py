"""Data: the deterministic, resumable token stream the trainer reads (`stream`), the sidecar that
says what a token file holds and how it must match the model (`sidecar`), and
`telepathy data prepare` (`prepare`, `cli`): local text through a local Hugging Face tokenizer
into a token file, streamed; or instruction data (chats, prompt-completion rows: `sources`
reads them, `chat` renders them and finds what counts in the loss) into a file of examples with
loss masks (`exfile`, read in packed rows by `examples`). `toy` makes a toy chat set and small
tokenizers with real chat templates (`telepathy data toy`).

May import: config, core, numpy, transformers, tokenizers and jinja2 (prepare, chat, toy);
pyarrow and datasets where installed (sources: the extra `telepathy[datasets]`).
"""
