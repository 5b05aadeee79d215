"""LightningModules: the only place (with callbacks/ and strategies/) where kvtrain touches Lightning."""

from kvtrain.modules.causal_lm import CausalLMModule, LoRASettings
from kvtrain.modules.grpo import GRPOModule, RewardSettings

__all__ = ["CausalLMModule", "GRPOModule", "LoRASettings", "RewardSettings"]
