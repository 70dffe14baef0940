"""What a failing stage shows on the terminal: its one ``error:`` line, no Prefect tracebacks.

A stage that runs as a Prefect child run also logs that line to its run (so the server
has it); the terminal gets it once, from the CLI.

When a task or flow run fails, Prefect's engine logs the exception with its
traceback (``Task run failed with exception ...``, ``Encountered exception during
execution ...``) and then ``Finished in state Failed(...)``, on the loggers
``prefect.task_runs`` and ``prefect.flow_runs``. Those loggers have Prefect's API
handler, which sends the records (traceback included) to the server, and propagate
to the root logger, whose ``PrefectConsoleHandler`` prints them on stderr. A filter
on the console handler alone keeps them off the terminal and leaves the API
handler, and so the run's log on the server, as it was.
"""

from __future__ import annotations

import logging

RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


class PrefectFailureFilter(logging.Filter):
    """Drops the engine's failure reports of flow and task runs; passes everything else."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not any(record.name == n or record.name.startswith(n + ".") for n in RUN_LOGGERS):
            return True
        if record.exc_info and record.levelno >= logging.ERROR:
            return False  # the engine's "failed with exception" report and its traceback
        if str(record.msg).startswith("fcn-pipeline ") and ": error: " in record.getMessage():
            return False  # the stage's error line, for the run's log: the CLI prints it
        return not str(record.msg).startswith("Finished in state Failed")


def quiet_prefect_failures() -> int:
    """Add :class:`PrefectFailureFilter` to every Prefect console handler configured now.

    Configures Prefect's logging first if that has not happened yet (``import prefect``
    alone does not). Returns the number of handlers filtered.
    """
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.logging.handlers import PrefectConsoleHandler

    ensure_logging_setup()

    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    handlers = {
        id(handler): handler
        for logger in loggers
        for handler in getattr(logger, "handlers", [])
        if isinstance(handler, PrefectConsoleHandler)
    }
    for handler in handlers.values():
        if not any(isinstance(f, PrefectFailureFilter) for f in handler.filters):
            handler.addFilter(PrefectFailureFilter())
    return len(handlers)
