"""LightningModules: the only place (with callbacks/ and strategies/) where kvtrain touches Lightning."""

from kvtrain.modules.causal_lm import CausalLMModule, LoRASettings

__all__ = ["CausalLMModule", "LoRASettings"]
