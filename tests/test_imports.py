"""Importing the package is silent, with the optional backends (torchao, bitsandbytes) installed or not."""

import logging
import subprocess
import sys

from stackwise_hf import quiet_backends

# Exit status 3: torchao is installed but was not imported, so the check below would prove nothing.
_IMPORT = """
import importlib.util, sys
import stackwise_hf, stackwise_hf.adapters, stackwise_hf.training, stackwise_hf.cli
if importlib.util.find_spec("torchao") is not None and "torchao" not in sys.modules:
    sys.exit(3)
"""


def test_importing_the_package_prints_nothing():
    result = subprocess.run([sys.executable, "-c", _IMPORT], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert result.stderr == ""


def test_other_records_of_the_filtered_loggers_still_pass():
    quiet_backends.install()
    torchao = logging.getLogger("torchao")
    known = logging.LogRecord("torchao", logging.WARNING, __file__, 1,
                              "Failed to load /x/site-packages/torchao/_C_mxfp8.abi3.so: no CUDA", None, None)
    other = logging.LogRecord("torchao", logging.WARNING, __file__, 1, "Failed to quantize layer 3", None, None)
    assert not torchao.filter(known)
    assert torchao.filter(other)

