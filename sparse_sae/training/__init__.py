"""Training: the configuration, the trainer, checkpoints, data loading and prefetch,
``torch.distributed``, the metrics log and the run lock (docs/architecture.md)."""
from sparse_sae.training.config import TrainConfig
from sparse_sae.training.trainer import NonFiniteLossError, Trainer

__all__ = ["TrainConfig", "Trainer", "NonFiniteLossError"]
