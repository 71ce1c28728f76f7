"""histofold: leakage-safe k-fold TFRecords, fold training, TTA ensembles and reports for histopathology.

Importing the package imports no TensorFlow; modules that need it import it themselves, so worker
processes (image loading, hashing, encoding) stay light.
"""
__version__ = "0.1.0"
