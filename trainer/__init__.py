"""Fine-tuning and evaluation on a site's image-level labels, and synthetic mammograms."""

__version__ = "0.1.0"
