"""Fine-tuning and evaluation on a site's image-level labels, and synthetic mammograms."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mammo-ai-plugin")
except PackageNotFoundError:  # a source tree that was never installed (`make install`)
    __version__ = "0+unknown"
