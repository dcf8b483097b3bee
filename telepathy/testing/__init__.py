"""Test hooks, apart from library code: points where a test kills, holds or fails a real process
(`faults`, from TELEPATHY_FAULT) and a dump of the full optimizer state (`statedump`, from
TELEPATHY_DUMP_STATE). Library code calls them; unset, every call is a no-op.

May import: core, engine (the state dump gathers through the DeepSpeed adapter).
"""
