"""A training run makes no weights it does not use: a resumed run restores into abstract shapes
and a fine-tuning run loads its start weights; only a fresh run draws random ones (for 8x7B in
float32, drawing and dropping them would double the start-up memory)."""

import jax

from mixtral_jax.train import trainer
from mixtral_jax.train.config import load_run_config

SMALL = [
    "model.num_layers=1",
    "train.batch_size=2",
    "train.seq_len=16",
    "data.vocab_size=128",
    "train.eval_every=1000",
    "train.warmup_steps=1",
    "checkpoint.save_every=2",
]


def test_only_a_fresh_run_draws_random_weights(tmp_path, monkeypatch):
    drawn = []  # one entry per parameter init: True when it made real (not abstract) weights
    real_init = trainer.init_params

    def recording_init(model_cfg, mesh, seed=0):
        params = real_init(model_cfg, mesh, seed)
        drawn.append(not isinstance(jax.tree.leaves(params)[0], jax.core.Tracer))
        return params

    monkeypatch.setattr(trainer, "init_params", recording_init)
    run_dir = tmp_path / "run"
    trainer.run(
        load_run_config(None, [f"checkpoint.dir={run_dir}", "train.steps=2", *SMALL]),
        show_progress=False,
    )
    assert drawn.count(True) == 1  # the fresh run: its random start
    drawn.clear()
    trainer.run(
        load_run_config(None, [f"checkpoint.dir={run_dir}", "train.steps=3", *SMALL]),
        show_progress=False,
    )
    assert drawn and not any(drawn)  # resumed from step 2: shapes only
    drawn.clear()
    trainer.run(
        load_run_config(
            None,
            [
                f"checkpoint.dir={tmp_path / 'tune'}",
                "train.steps=1",
                f"checkpoint.init_from={run_dir / 'model'}",
                *SMALL,
            ],
        ),
        show_progress=False,
    )
    assert drawn and not any(drawn)  # fine-tuning: the start weights are loaded
