"""The networks, in plain PyTorch: built eagerly from a small typed config, importing only `polyformer.backbone`.

A task (`polyformer.tasks`) holds one of these as `self.model` and owns everything around it: loss, metrics,
decoding calls, logging, checkpoints. Nothing here imports Lightning, a task, data or a logger
(tests/test_package_boundaries.py checks that in a fresh interpreter).
"""
