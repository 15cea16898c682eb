"""hf_squeeze: Squeezed Attention (arXiv 2411.09688) for Hugging Face transformers.

`import hf_squeeze` registers `attn_implementation="squeezed"` with transformers.
"""

from .cache import SqueezedCache
from .config import SqueezeConfig
from .generation import generate_greedy
from .integrations.generate import cache_kwargs
from .integrations.transformers import layer_devices
from .integrations.transformers import register as _register
from .assets import load_default_model

_register()

__all__ = ["SqueezedCache", "SqueezeConfig", "cache_kwargs", "generate_greedy", "layer_devices", "load_default_model"]
__version__ = "0.1.0"
