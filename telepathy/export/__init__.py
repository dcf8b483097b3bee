"""Nothing trapped: a run's weights out as an ordinary Hugging Face model directory.

- `shards`: the size of a shard and which tensors go in each (pure);
- `hf`: the newest verified checkpoint (or a chosen step), consolidated with DeepSpeed's own
  `zero_to_fp32` one parameter at a time, written as `config.json`, `generation_config.json` and
  safetensors shards into a directory that appears whole or not at all;
- `module`: a run of model.module as `trained.safetensors` and `telepathy-module.json`, and
  `load_module(DIR)`, which builds the module again and loads them;
- `cli`: `telepathy export RUN_DIR --out DIR`.

May import: checkpoint, engine, config, core, transformers, safetensors.
"""


def load_module(directory):
    """The module of an export of a model.module run, built and loaded (export.module)."""
    from .module import load_module as load

    return load(directory)
