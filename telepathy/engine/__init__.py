"""What runs the math: the process group (`distributed`), the model with its optimizer, LR
schedule and DeepSpeed ZeRO-3 engine (`build`, `schedule`), and `adapter`, the one file that
reaches into DeepSpeed's internals.

May import: config, core, torch, deepspeed, transformers.
"""
