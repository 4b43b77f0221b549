"""Drops the known, harmless lines optional backends log while transformers and peft import them.

Every rack is a `PreTrainedModel`, and transformers' `modeling_utils` imports torchao whenever it is
installed (its quantizer registry does so at import); peft imports bitsandbytes the same way. So these
imports cannot be deferred to first use from here. What the backends log then concerns kernels the
process does not need: torchao's CUDA / other-Python-ABI extension files that a CPU build cannot load,
torch's deprecation of torchao's enum registration, bitsandbytes' optional `kernels` package. With no
logging configured, Python's last-resort handler prints them on every `import stackwise_hf`.

Only these messages are filtered, on the loggers that emit them; every other record passes, and the
backends behave the same (the int8/NF4 tests run with them installed).
"""

from __future__ import annotations

import logging
import re

# logger name -> a message that logger emits at import, known to be harmless here.
KNOWN_IMPORT_MESSAGES = {
    "torchao": r"^Failed to load .*torchao.*_C[^/]*\.so",
    "torch.utils._pytree": r"is an Enum subclass and is now natively supported by torch\.compile",
    "bitsandbytes.backends.cpu.ops": r"^Failed to load CPU gemm_4bit_forward from kernels-community",
}


class _DropMessage(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.search(record.getMessage()) is None


def install() -> None:
    """Adds the filters (once per logger; calling again changes nothing)."""
    for name, pattern in KNOWN_IMPORT_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) for f in logger.filters):
            logger.addFilter(_DropMessage(pattern))
