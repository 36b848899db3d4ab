"""histod: classify histopathology images as Benign or Malignant, and keep an audit trail of every call.

Nothing heavy happens on import: no model load, no database connection, no TensorFlow.
"""

__version__ = "0.1.0"

LABELS: tuple[str, str] = ("Benign", "Malignant")
"""Class names in model-output order: p_malignant >= threshold means LABELS[1]."""
