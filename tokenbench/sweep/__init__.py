"""Sweeps: what to measure, expanded into runs, executed against a results store.

One job per module, data flowing one way:

- :mod:`.format`: the sweep file format (TOML or YAML), its validation and data classes;
- :mod:`.flags`: the same sweep given as ``tokenbench run`` flags;
- :mod:`.search`: the matched-FLOPs search and its cache;
- :mod:`.expand`: a sweep's entries as concrete runs;
- :mod:`.preflight`: what would fail part-way, refused before anything is written;
- :mod:`.plan`: the runs' store keys and the plan file (``sweep.json``);
- :mod:`.execute`: measuring the plan against a store;
- :mod:`.timing`: what a sweep times on this CPU by default and about how long it takes.

The names below are the package's interface; other modules import them from here.
"""

from .execute import Step, execute, flagged_timing_keys
from .expand import Run, count_searches, expand, fmt_value
from .flags import sweep_from_flags
from .format import (DATA_KEYS, DEFAULT_TOLERANCE, DENSE_METHOD, ENTRY_KEYS, KINDS, RUNS_DIR, SWEEPS_DIR,
                     THROUGHPUT_KEYS, TOP_KEYS, MethodEntry, Sweep, load_sweep, merge_overrides, packaged_sweeps,
                     parse_sweep, read_sweep_file, resolve_sweep_path)
from .plan import (PLAN_FILE, baseline_spec, kinds_for, plan_dict, prepare, read_plan, run_keys, run_settings,
                   search_data, write_plan)
from .preflight import preflight
from .search import (CACHE_FILE, FlopsSearch, SearchData, SearchResult, analytic_block_cost, dense_schedule,
                     model_depth)

__all__ = [
    "CACHE_FILE", "DATA_KEYS", "DEFAULT_TOLERANCE", "DENSE_METHOD", "ENTRY_KEYS", "KINDS", "PLAN_FILE",
    "RUNS_DIR", "SWEEPS_DIR", "THROUGHPUT_KEYS", "TOP_KEYS",
    "FlopsSearch", "MethodEntry", "Run", "SearchData", "SearchResult", "Step", "Sweep",
    "analytic_block_cost", "baseline_spec", "count_searches", "dense_schedule", "execute", "expand",
    "flagged_timing_keys", "fmt_value", "kinds_for", "load_sweep", "merge_overrides", "model_depth",
    "packaged_sweeps", "parse_sweep", "plan_dict", "prepare", "preflight", "read_plan", "read_sweep_file",
    "resolve_sweep_path", "run_keys", "run_settings", "search_data", "sweep_from_flags", "write_plan",
]
