"""Trackers (TensorBoard, Weights & Biases, MLflow) fed from the run's own files.

Rank 0 starts a relay process per allocation (`process`, `relay`); it follows metrics.jsonl,
events.jsonl and system-*.jsonl and hands them to the trackers (`sinks`, one class each) as
scalars and notes (`records`, pure), so the training loop never calls a tracker and a tracker
that fails or blocks cannot touch a step. Each run directory keeps one tracker run for its whole
life (`state`: track/state.json, the W&B and MLflow run ids), resumed at every allocation; a
step trained again after a crash appears once (docs/tracking.md).

May import: config, core, torch.utils.tensorboard, wandb, mlflow (in the relay process only).
"""
