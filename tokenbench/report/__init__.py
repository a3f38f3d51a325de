"""The report: tables and plots from stored records; never measures.

``tokenbench.report.write.write_report(out)`` reads the records under ``<out>/records/`` (damaged ones are set
aside by the store, with a warning) and the sweep's plan ``<out>/sweep.json`` when there
is one (which runs, labels, FLOPs targets), and writes:

- ``results.md``, ``results.csv``, ``results.tex`` (and ``results_paper.tex``, a compact
  table for one paper column: method, setting, GFLOPs, speedup, top-1 ± CI): one row per run, with method,
  parameters, GFLOPs and FLOPs relative to the dense model, throughput (median and
  quartiles) and speedup over dense on the same device and settings, top-1 with its 95%
  (Wilson) interval, top-5, parameters, device, status of learned parts, McNemar's exact
  test against dense on the same images (p and discordant counts) and flags.  A
  non-deterministic method measured with several seeds gets one row with mean ± std
  over the seeds; the CSV keeps the per-seed rows too (``row_type`` seed / mean / run);
- ``plots/accuracy_vs_gflops.{png,pdf}`` and ``plots/accuracy_vs_throughput.{png,pdf}``
  (one pair per model when a sweep has several): one line per method, dense marked, the
  Pareto frontier over all methods, 95% intervals as bars; 3.4 in wide, 8 pt fonts,
  seaborn's colour-blind palette;
- ``report.html`` (with ``html``; every sweep writes it): the same plots to explore, with hover,
  a family filter and a sortable table, in one self-contained page (:mod:`tokenbench.report.html`).

Without a plan (records written by ``tokenbench eval --results DIR``, say) every record
in the directory is reported: runs are grouped by model, method and parameters, and the
most common throughput and accuracy settings are used.

One module per job: :mod:`~tokenbench.report.collect` (rows from the store),
:mod:`~tokenbench.report.rows` (the typed row), :mod:`~tokenbench.report.stats` (against dense, over
seeds, paired tests), :mod:`~tokenbench.report.tables` and :mod:`~tokenbench.report.plot` (the
outputs), :mod:`~tokenbench.report.html` (the interactive page), :mod:`~tokenbench.report.paired`
and :mod:`~tokenbench.report.paired_dense` (``tokenbench compare``), :mod:`~tokenbench.report.render`
(cells, tables and plot style shared with the paper figures and bench.py) and
:mod:`~tokenbench.report.write` (the files of a results directory).
"""
