"""lit-ovis: train the Ovis-Image text-to-image model with PyTorch Lightning.

`lit_ovis.load_module(path)` turns a training checkpoint, a sharded checkpoint directory or a diffusers
pipeline folder into a module that is ready to `sample()` (see `lit_ovis.loading`). It is imported on first
use, so `import lit_ovis.<module>` stays light.
"""

import logging as _logging

# With torchao installed (the quantised-base option of LoRA), diffusers imports it whenever models load, and that
# import prints three warnings that concern neither our code nor the user (torch's notice about torchao's Enum
# registrations, diffusers' note about torchao tensor subclasses it cannot import). They would bury the one-line
# errors and the first lines of every command: silence those two loggers only.
for _name in ("torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)


def __getattr__(name: str):
    if name == "load_module":
        from lit_ovis.loading import load_module

        return load_module
    raise AttributeError(f"module 'lit_ovis' has no attribute '{name}'")
