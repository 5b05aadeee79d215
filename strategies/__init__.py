"""Lightning strategies, installed as `kvtrain.strategies` (DeepSpeed ZeRO presets land here)."""
