"""Built-in models to prune: a small MLP classifier and a small GPT-style language model."""
from gradprobe_dist.models.mlp import SimpleMLP
from gradprobe_dist.models.transformer import CausalLMOutput, TinyGPT, TinyGPTConfig

__all__ = ["CausalLMOutput", "SimpleMLP", "TinyGPT", "TinyGPTConfig"]
