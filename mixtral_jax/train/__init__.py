"""Training: run config (`config.py`), data (`data.py`), the loss (`losses.py`), metrics, the
compiled step (`step.py`) and the run loop with checkpoints (`trainer.py`).
"""
