"""stackwise_hf: progressive, stack-wise training of transformer language models on the Hugging Face stack.

Importing the package registers the rack with the Auto classes, so `AutoConfig`, `AutoModel`,
`AutoModelForCausalLM` and `AutoModelForMaskedLM` load a saved rack by its `model_type`.
"""

from . import quiet_backends

quiet_backends.install()  # before transformers imports torchao/bitsandbytes (see quiet_backends.py)

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM  # noqa: E402

from .configuration_stackwise import StackWiseConfig  # noqa: E402
from .errors import CheckpointError, CorruptFileError, ShapeMismatchError, StackWiseError  # noqa: E402
from .modeling_stackwise import (  # noqa: E402
    StackWiseForCausalLM,
    StackWiseForMaskedLM,
    StackWiseModel,
    StackWisePreTrainedModel,
)

AutoConfig.register(StackWiseConfig.model_type, StackWiseConfig, exist_ok=True)
AutoModel.register(StackWiseConfig, StackWiseModel, exist_ok=True)
AutoModelForCausalLM.register(StackWiseConfig, StackWiseForCausalLM, exist_ok=True)
AutoModelForMaskedLM.register(StackWiseConfig, StackWiseForMaskedLM, exist_ok=True)

__version__ = "0.1.0"

__all__ = [
    "StackWiseConfig",
    "StackWiseModel",
    "StackWisePreTrainedModel",
    "StackWiseForCausalLM",
    "StackWiseForMaskedLM",
    "StackWiseError",
    "CorruptFileError",
    "ShapeMismatchError",
    "CheckpointError",
]
