"""Data pipeline: RLDS datasets on disk -> standardized, normalized, interleaved frames -> padded torch batches.

TensorFlow is imported only inside this package (after `vla_train` fixed the import order) and never sees a GPU.
"""
