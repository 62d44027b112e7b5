"""imagen-transfer: transfer learning with Imagen-style text-to-image diffusion cascades.

Importing the package is cheap and offline: heavy libraries (torch, diffusers, transformers) load only in the
modules that need them.
"""

__version__ = "0.1.0"
