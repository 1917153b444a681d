"""Checkpoint formats: Hugging Face safetensors (read/write, streamed) and this project's Orbax layout."""
