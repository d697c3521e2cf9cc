"""Reading and writing files: tensors, checkpoint formats, traces, JSON documents, atomic writes.

The lowest layer of rankscope: it imports nothing above it (see docs/architecture.md).
"""
