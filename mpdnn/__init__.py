"""mpdnn: learned mixed-precision quantization of neural networks in JAX/Flax.

Subpackages import only downward: ``quantizers`` (pure JAX) ← ``nn`` ← ``models`` ← ``optim``
← ``training``. Importing ``mpdnn`` itself loads nothing heavy.
"""

__version__ = "0.1.0"
