"""Foundations every room may use: errors, exit codes, the run-directory contract (file names,
event names and records), JSON-lines files, durable writes, the run lock, the one module that
runs programs, logging, and where the shipped scripts and configs are.

May import: the standard library only; nothing else of telepathy.
`errors`, `exits`, `paths` and `events` are pure; `jsonl`, `eventlog`, `fsutil`, `runlock`,
`proc`, `logs`, `resources` and `background` touch the world (files, locks, processes, logging,
threads).
"""
