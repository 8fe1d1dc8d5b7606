"""FedSpa on Fashion-MNIST with the training recipe of its authors' group's public code (rong-dai/DisPFL).

    fedspa-jax run --config fashion_mnist_reference --out runs/fashion_mnist_reference
    fedspa-jax run --config fashion_mnist_reference --set partition=pathological --set data.classes_per_client=2
    fedspa-jax run --config fashion_mnist_reference --set smoke=true --out runs/fashion_mnist_reference-smoke

The recipe, as that code's defaults set it (`main_dispfl.py`, `my_model_trainer.py`): 5 local epochs at batch 128,
plain SGD (momentum 0) with weight decay 5e-4 at lr 0.1 decayed by 0.998 per round, every local step's gradient
clipped to global norm 10, density 0.5, prune rate alpha 0.5; Dirichlet(0.3) over 100 clients, 10 per round (their
code's default split). Here on our data (Fashion-MNIST, LeNet-5), 100 rounds; each client is scored with the sparse
model it ended its last local training with ("local"), with m_k ⊙ w beside it, and after 1 epoch of fine-tuning
at the final evaluation.

This is the group's optimizer only. Their method and baseline settings (random regrowth, different initial masks,
masked-mean aggregation, dense clipping, masked biases, their balanced Dirichlet split, Ditto's 2 + 3 epochs,
FedAvg-FT's 5 epochs, ...) are the `dispfl` recipe: `fedspa-jax run --recipe dispfl --algorithm A`
(`fedspa_jax.recipes`).
"""

from fedspa_jax.config import Config
from fedspa_jax.configs._paper import paper_config


def get_config(smoke: bool = False) -> Config:
  config = paper_config(
      dataset="fashion_mnist",
      model="lenet5",
      partition="dirichlet",
      data_args={"alpha": 0.3},
      rounds=100,
      lr=0.1,
      smoke=smoke,
  )
  config.hparams.update(momentum=0.0, weight_decay=5e-4, lr_decay=0.998, clip_norm=10.0, alpha=0.5,
                        personal_model="local")
  if not smoke:
    config.hparams.update(local_epochs=5, batch_size=128)
  config.eval_every, config.rounds_per_dispatch = 10, 10
  if smoke:
    config.eval_every, config.rounds_per_dispatch = 2, 1
  config.eval_finetune_epochs = 1
  return config
