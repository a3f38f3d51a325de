"""The ``tokenbench`` command line: parse, call the library, print.

:mod:`~tokenbench.cli.main` is the entry point (one error line and exit code 2 for bad input),
:mod:`~tokenbench.cli.app` assembles the typer app from one module per command family
(``flops``, ``throughput``, ``eval``, ``train``, ``listing``, ``check``, ``sweep``, ``visualize``,
``figure``, ``analyze``; ``dense`` is ``eval`` and ``train`` on dense data), and
:mod:`~tokenbench.cli.common` holds what they share.
"""
