"""FCN semantic segmentation as a reproducible pipeline.

The library is pure Python and PyTorch, one module per concern: ``config``
(the typed ``params.yaml`` schema), ``store`` (the Parquet data contract),
``sources`` (dataset readers), ``ingest``, ``stats``, ``patches``, ``models``,
``losses``, ``metrics``. Orchestration (Prefect) lives in ``flows/`` and
versioning (DVC) in ``dvc.yaml``; nothing here imports either.
"""

__version__ = "0.1.0"
