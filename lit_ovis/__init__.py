"""lit-ovis: train the Ovis-Image text-to-image model with PyTorch Lightning.

`lit_ovis.load_module(path)` turns a training checkpoint, a sharded checkpoint directory or a diffusers
pipeline folder into a module that is ready to `sample()` (see `lit_ovis.loading`). It is imported on first
use, so `import lit_ovis.<module>` stays light.
"""


def __getattr__(name: str):
    if name == "load_module":
        from lit_ovis.loading import load_module

        return load_module
    raise AttributeError(f"module 'lit_ovis' has no attribute '{name}'")
