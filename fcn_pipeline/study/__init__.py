"""Studies: several settings of the pipeline, each trained with several seeds, compared.

A study file (``studies/<name>.yaml``) names a base (overrides of ``params.yaml``
applied to every run), settings (each a set of ``key=value`` overrides, as
``dvc exp run -S`` takes them) and seeds. Every (setting, seed) is one run; the
DVC driving lives in :mod:`flows.study_driver`. This package is the pure part,
one module per concern: :mod:`.plan` (the study file's schema, its checks against
``params.yaml``, the run plan), :mod:`.records` (training curves from DVCLive's TSV
files, each run's record), :mod:`.statistics` (aggregation over seeds, Welch's t-test,
Holm's correction) and :mod:`.report` (``results.json``, ``report.md``, PNG plots).

Example::

    study: upsample            # optional; default: the file name without .yaml
    base: [epochs.fcn8s=10]    # every run
    settings:
      frozen: [train.upsample=frozen]
      interp: [train.upsample=interp]
    seeds: [0, 1, 2]           # each sets every key in seed_keys (default train.seed)
    extra_seeds: {interp: [3, 4]}     # optional: more seeds for some settings
    comparisons: [[frozen, interp]]   # default: every setting against the first
"""

from fcn_pipeline.study.plan import STAGED, RunSpec, Study, StudyFile, load_study
from fcn_pipeline.study.records import (
    RunRecord,
    load_finished,
    restore_finished,
    run_record,
    save_finished,
    to_target,
    training_curve,
    tsv_column,
)
from fcn_pipeline.study.report import report_markdown, write_report
from fcn_pipeline.study.statistics import (
    aggregate,
    compare,
    compare_classes,
    holm,
    mean_std,
    welch_t_test,
    with_holm,
)

__all__ = [
    "STAGED",
    "RunRecord",
    "RunSpec",
    "Study",
    "StudyFile",
    "aggregate",
    "compare",
    "compare_classes",
    "holm",
    "load_finished",
    "load_study",
    "mean_std",
    "report_markdown",
    "restore_finished",
    "run_record",
    "save_finished",
    "to_target",
    "training_curve",
    "tsv_column",
    "welch_t_test",
    "with_holm",
    "write_report",
]
