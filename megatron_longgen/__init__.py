"""megatron_longgen: LongGen (arXiv 2410.01485) hybrid full/sparse attention Llama on Megatron-Core.

Nothing heavy is imported here: `import megatron_longgen` does not import Megatron-Core or torch.
Reading order: models/layer_pattern.py -> models/layer_specs.py -> attention/masks.py ->
context_parallel/ -> checkpoint/ -> training/trainer.py.
"""

__version__ = "0.1.0"
