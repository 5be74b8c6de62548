"""Version differences of upstream packages, in one place (`mcore.py`: Megatron-Core 0.16.1 and 0.19.2)."""
