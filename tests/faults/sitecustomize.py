"""Fault injection for tests/test_distributed.py, from outside the library: a test
puts this directory first on ``PYTHONPATH``, and every Python process it starts
imports this module at start-up. In the training rank named by
``FCN_TEST_KILL_RANK`` (torchrun's ``RANK``), the first epoch exits the process at
once, without cleanup, as a crashed or killed rank would; other processes are left
alone."""

import os

_rank = os.environ.get("FCN_TEST_KILL_RANK")
if _rank is not None and os.environ.get("RANK") == _rank.strip():
    import fcn_pipeline.training as _training

    def _die(*args: object, **kwargs: object) -> None:
        os._exit(1)

    _training.train_one_epoch = _die
