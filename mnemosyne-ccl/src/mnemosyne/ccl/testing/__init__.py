"""Testing helpers for mnemosyne-ccl (public but only meant for tests and benchmarks).

:mod:`mnemosyne.ccl.testing._workers` holds the code that spawned rank processes run
(``python -m mnemosyne.ccl.testing._workers <json>``), because pytest test modules are
not importable by child processes.
"""

__all__: list[str] = []
