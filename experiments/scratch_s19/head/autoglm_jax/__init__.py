"""autoglm-jax: GLM-4 family language models on JAX/XLA.

Data flows one way: checkpoint -> params -> (quantize) -> engine -> tokens.
"""

from .config import ConfigError, GLMConfig
from .engine import LLM, AsyncLLM, Completion, SamplingParams
from .generate import GenerationConfig, generate, generate_stream
from .loading import from_pretrained
from .memory import MemoryPlan, plan_memory
from .model import GLMForCausalLM, QuantizedLinear, quantize_model

__all__ = ["AsyncLLM", "Completion", "ConfigError", "GLMConfig", "GLMForCausalLM", "GenerationConfig", "LLM",
           "MemoryPlan", "QuantizedLinear", "SamplingParams", "from_pretrained", "generate", "generate_stream",
           "plan_memory", "quantize_model"]
