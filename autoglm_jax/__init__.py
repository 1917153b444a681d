"""autoglm-jax: GLM-4 family language models on JAX/XLA."""

from .config import GLMConfig, ConfigError
from .generate import GenerationConfig, generate, generate_stream
from .loading import from_pretrained
from .model import GLMForCausalLM

__all__ = ["ConfigError", "GLMConfig", "GLMForCausalLM", "GenerationConfig", "from_pretrained", "generate",
           "generate_stream"]
