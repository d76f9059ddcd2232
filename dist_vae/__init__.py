"""dist-vae: distributed training of high-resolution VAEs (iterative injection, PixelCNN++ decoders)."""

__version__ = "0.1.0"
