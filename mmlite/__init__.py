"""mmlite: multimodal image-text models from scratch, the library the book's chapters build."""

__version__ = "0.1.0"
