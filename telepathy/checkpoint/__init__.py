"""Checkpoints: one directory per step, complete only once its manifest is durable.

- `manifest`: what a manifest says and what makes a checkpoint complete (pure);
- `hashing`: SHA-256 chunks while writing and when verifying; `directory`: which checkpoints
  exist, and the one delete and prune;
- `writer`: snapshot to host memory, then serialise, hash and fsync in the background;
  `reader`: read a torch file once, verified and deserialised from the same bytes;
  `manager`: the collective save, find and load; `rng`: the RNG state a checkpoint carries;
- `universal`: a checkpoint converted with DeepSpeed's ds_to_universal for another world size;
- `cli`: `telepathy checkpoint verify|list|prune RUN_DIR`.

May import: engine (the DeepSpeed adapter), testing (fault points), core, torch, safetensors.
Importing this package imports none of its modules: the requeue step and the CLI stay light.
"""
