"""mask-itm: Multimodal Aligned Semantic Knowledge for unpaired image-text matching.

The library imports without Ray, a GPU, detectron2 or a network; orchestration lives in
:mod:`mask.pipeline` and ``jobs/``.
"""

__version__ = "0.1.0"
