"""Data: the deterministic, resumable token stream the trainer reads (`stream`), the sidecar that
says what a token file holds and how it must match the model (`sidecar`), and
`telepathy data prepare` (`prepare`, `cli`): local text through a local Hugging Face tokenizer
into a token file, streamed.

May import: config, core, numpy, transformers and tokenizers (prepare only).
"""
