"""``deep_ep.buffer``: where DeepEP keeps its ``Buffer`` class."""
from ..buffer import Buffer

__all__ = ["Buffer"]
