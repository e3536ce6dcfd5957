"""capfilt: BLIP CapFilt (caption + filter) for webdataset shards at scale.

The package has no side effects at import time; heavy dependencies (torch,
transformers, ray) are imported by the modules that use them.
"""

__version__ = "0.1.0"
