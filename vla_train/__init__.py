"""vla-train: an open, tested training pipeline for vision-language-action (VLA) robot policies.

This file is the one place that fixes the import order of the heavy native libraries. Importing TensorFlow before
torchvision (which timm imports) segfaults the process, so the package imports torch, torchvision and timm here,
before any of its modules can import TensorFlow. Every module of the package, and every entry point, imports
`vla_train` first by construction (Python runs this file before any submodule).
"""

import os
import sys

if "tensorflow" in sys.modules and "torchvision" not in sys.modules:
    raise ImportError(
        "tensorflow was imported before vla_train; importing torchvision after tensorflow segfaults this process. "
        "Fix: `import vla_train` (or torch, torchvision and timm) before `import tensorflow`."
    )

# TensorFlow must never grab a GPU or flood the log; set before it can be imported anywhere in the package.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import timm
import torch
import torchvision

__version__ = "0.1.0"
