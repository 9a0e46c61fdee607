"""Export a trained mixed-precision network as bit-packed integers (docs/export.md).

    python -m mpdnn.export --workdir RUN [--format mpq|onnx] [--out FILE] [--verify N] [--json]

Modules:
  codec: one tensor's encoding: weights as b-bit integer codes (:func:`encode_weight`,
    :class:`WeightTensor`), the bitstream (:func:`pack_bits`, :func:`unpack_bits`), activation
    grids (:func:`encode_activation`, :class:`ActivationQuantizer`), :class:`ExportError`.
  mpq: the ``.mpq`` file: :func:`write`, :func:`load`, :class:`ExportedModel`, and
    :func:`export_model` for a built NNX model.
  run: a finished training run → its delivered model (:func:`load_run`).
  reference: the NumPy integer reference forward of ResNet-20 (:func:`reference_forward`,
    :func:`reference_trace`, :class:`Trace`) and its comparison with the Flax model
    (:func:`flax_forward`, :func:`compare`).
  to_onnx: the same model as an ONNX QDQ graph that onnxruntime runs (:func:`export_onnx`,
    :func:`to_onnx`, :func:`compare_onnx`; needs the ``export`` extra).
  cli: ``python -m mpdnn.export`` (:func:`main`).
"""

from mpdnn.export.cli import main, parse_args
from mpdnn.export.codec import (
    FLOAT_BITS,
    ActivationQuantizer,
    ExportError,
    WeightTensor,
    encode_activation,
    encode_weight,
    pack_bits,
    unpack_bits,
)
from mpdnn.export.mpq import (
    FIXED_HEADER_BYTES,
    MAGIC,
    VERSION,
    ExportedModel,
    export_model,
    load,
    write,
)
from mpdnn.export.reference import (
    Trace,
    compare,
    flax_forward,
    reference_forward,
    reference_trace,
)
from mpdnn.export.run import load_run

__all__ = [
    "FIXED_HEADER_BYTES",
    "FLOAT_BITS",
    "MAGIC",
    "VERSION",
    "ActivationQuantizer",
    "ExportError",
    "ExportedModel",
    "Trace",
    "WeightTensor",
    "compare",
    "encode_activation",
    "encode_weight",
    "export_model",
    "flax_forward",
    "load",
    "load_run",
    "main",
    "pack_bits",
    "parse_args",
    "reference_forward",
    "reference_trace",
    "unpack_bits",
    "write",
]
