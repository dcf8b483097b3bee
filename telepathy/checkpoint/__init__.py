"""Checkpoints: the manager (save, find, load, prune), manifests, and the background writer.

`python -m telepathy.checkpoint verify|list|prune RUN_DIR` inspects a run's checkpoints.
"""

from .manager import STATE, CheckpointManager, Found, rank_state_file, verify_collective
from .manifest import (CHUNK_BYTES, FORMAT, HASH_THREADS, hash_file, list_files, read_manifest,
                       seal, tasks, verify)

__all__ = ["CHUNK_BYTES", "FORMAT", "HASH_THREADS", "STATE", "CheckpointManager", "Found",
           "hash_file", "list_files", "rank_state_file", "read_manifest", "seal", "tasks", "verify",
           "verify_collective"]
