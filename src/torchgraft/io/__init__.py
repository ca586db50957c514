"""Reading checkpoints safely and writing outputs atomically."""

from torchgraft.io.read import Source, TensorInfo, load
from torchgraft.io.write import atomic_write, save_safetensors

__all__ = ["Source", "TensorInfo", "load", "atomic_write", "save_safetensors"]
