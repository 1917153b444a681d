"""Training: optax AdamW with warmup + cosine, clipping, accumulation, remat policies on a scanned layer stack,
exact resume from atomic Orbax checkpoints, and a training-memory estimator."""

from .config import TrainConfig, TrainConfigError
from .data import TokenBatches, eval_batches, pack_documents
from .loop import TrainResult, evaluate, train
from .memory_estimate import MemoryEstimate, estimate_training_memory
from .scanned import ScannedGLM, params_from_model, stack_layers, unstack_layers
from .state import TrainState, latest_checkpoint, restore_train_state, save_train_state

__all__ = ["ScannedGLM", "TokenBatches", "TrainConfig", "TrainConfigError", "TrainResult", "TrainState",
           "MemoryEstimate", "estimate_training_memory", "eval_batches", "evaluate", "latest_checkpoint", "pack_documents", "params_from_model",
           "restore_train_state", "save_train_state", "stack_layers", "train", "unstack_layers"]
