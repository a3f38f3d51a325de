"""MkDocs hook: the pages written from the code and the committed results at build time.

- ``methods/index.md`` and one ``methods/<name>.md`` per registered method, from its declaration
  (family, knob, parameters with ranges, backbones; paper, official code, licence and how it
  was checked where the class declares them), ``docs/method_provenance.toml`` (the same for the
  built-in methods), ``docs/method_flops.json``
  (its FLOPs at the default setting on DeiT-S, written by ``docs/gen_method_flops.py``) and the
  DeiT-S figures of ``tokenbench/recipes/figures/published.csv``;
- ``reference/<sweep>.md`` per committed sweep: its ``results.md`` (written by the tool from the
  records) and its plots;
- the PNG figures under ``results/`` that the pages show, copied into the site.
"""

from __future__ import annotations

import csv
import json
import sys
import tomllib
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
DENSE = "none"
DEIT_S = "deit_small_patch16_224"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _methods() -> list[dict]:
    from tokenbench.registry import list_methods

    return list_methods()


def _sweeps() -> list[str]:
    """The committed sweeps: results folders holding a results.md and a plan."""
    return sorted(p.parent.name for p in (ROOT / "results").glob("*/results.md") if (p.parent / "sweep.json").exists())


def _kind(m: dict) -> str:
    return "learned" if m["learned"] else "training-free"


def _cell(s) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def method_index(methods: list[dict], prov: dict) -> str:
    lines = ["# Methods", "",
             f"{len([m for m in methods if m['name'] != DENSE])} token-reduction methods and the dense model, "
             "as the registry declares them (`tokenbench list`; `tokenbench list NAME` for one in full). "
             "Each page is written from the method's declaration when this site is built.", "",
             "| method | family | training | budget knob | paper | summary |", "|---|---|---|---|---|---|"]
    for m in methods:
        p = provenance(m["name"], prov)
        lines.append(f"| [`{m['name']}`]({m['name']}.md) | {m['family']} | {_kind(m)} | "
                     f"{'`' + m['knob'] + '`' if m.get('knob') else '–'} | {_cell(p.get('paper', '–'))} | "
                     f"{_cell(m['summary'])} |")
    lines += ["", "Our code is our own; results of methods whose original is CC BY-NC inherit no licence from "
              "it, but users redistributing results should know the original's terms."]
    return "\n".join(lines) + "\n"


def _params_table(params: list[dict], knob) -> list[str]:
    lines = ["| parameter | type | default | range | what it does |", "|---|---|---|---|---|"]
    for p in params:
        name = f"`{p['name']}`" + (" (budget knob)" if p["name"] == knob else "")
        lines.append(f"| {name} | {p['type']} | `{json.dumps(p['default'])}` | {p.get('range') or '–'} | "
                     f"{_cell(p['help'])} |")
    return lines


def _published(name: str) -> list[dict]:
    with open(ROOT / "tokenbench" / "recipes" / "figures" / "published.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r["method"] == name and r["model"].startswith(DEIT_S) and r["gflops"]]


def provenance(name: str, prov: dict) -> dict:
    """What the method's class declares of its origin (``Method.paper``, ``code``, ``code_url``,
    ``licence``, ``verified``), else the entry of docs/method_provenance.toml."""
    from tokenbench.registry import get_method

    cls = get_method(name)
    declared = {"paper": cls.paper, "code": cls.code, "code_url": cls.code_url, "licence": cls.licence,
                "verified": cls.verified}
    return {**prov.get(name, {}), **{k: v for k, v in declared.items() if v is not None}}


def _grid_text(declared) -> str:
    """How the method hands back the full feature map of a dense task, in words (per family)."""
    from tokenbench.registry import GRID_RESTORE_TEXT, GridRestore

    if isinstance(declared, dict):
        return "; ".join(f"{fam}: {GRID_RESTORE_TEXT[GridRestore(v)]}" for fam, v in declared.items())
    return GRID_RESTORE_TEXT[GridRestore(declared or "none")]


def method_page(m: dict, prov: dict, counted: dict) -> str:
    p = provenance(m["name"], prov)
    note = p.get("family_note") or ""
    family = note if note.startswith(m["family"]) else m["family"] + (f" ({note})" if note not in ("", "–") else "")
    facts = [("family", family),
             ("training", p.get("training") or _kind(m)), ("version", m["version"]),
             ("backbones", ", ".join(m.get("backbones") or [])), ("budget knob", m.get("knob") or "–"),
             ("seed parameter", m.get("seed_param") or "–"),
             ("deterministic", "yes" if m.get("deterministic") else "no (seeded random choices)"),
             ("dense tasks (full map)", _grid_text(m.get("restores_grid")))]
    lines = [f"# `{m['name']}`", "", m["summary"], "", "| property | value |", "|---|---|"]
    lines += [f"| {k} | {_cell(v)} |" for k, v in facts]
    lines += ["", "## Parameters", ""]
    lines += _params_table(m["params"], m.get("knob")) if m["params"] else ["None."]
    if m.get("train_params"):
        lines += ["", "## Training parameters", "", "Accepted by `tokenbench train --set`.", ""]
        lines += _params_table(m["train_params"], None)
    lines += ["", "## Origin", ""]
    if p:
        code = f"[{p['code']}]({p['code_url']})" if p.get("code_url") else p.get("code", "–")
        lines += [f"- **Paper**: {p.get('paper', '–')}", f"- **Official code**: {code}",
                  f"- **Licence of the original**: {p.get('licence', '–')}", "",
                  "## How it was checked", "", p.get("verified", "–"), "",
                  "The official code's tests and how to run them: [Checking against the official code]"
                  "(../verification.md)."]
    else:
        lines.append("Not stated (a method from a package outside this repository: see its own documentation).")
    lines += ["", "## FLOPs on DeiT-S", ""]
    c = counted.get(m["name"])
    dense = (counted.get(DENSE) or {}).get("gflops")
    if c and c.get("gflops") is not None:
        setting = ", ".join(f"{k}={json.dumps(v)}" for k, v in c["params"].items()) or "no parameters"
        rel = f" ({100 * c['gflops'] / dense:.1f}% of the dense model's {dense:.3f})" if dense else ""
        untrained = " with its learned parts untrained (random init)" if m["learned"] else ""
        lines.append(f"At the default setting ({setting}){untrained}: **{c['gflops']:.3f} GFLOPs**{rel}, fvcore "
                     "(one multiply-add is one FLOP) on `deit_small_patch16_224` at 224 px, random weights, the mean "
                     "over 8 random images where the count depends on the image.")
    elif c:
        lines.append(f"Not counted: {c.get('error', 'the method does not run on DeiT-S')}.")
    else:
        lines.append("Not counted for this code yet (`make docs` counts it).")
    pub = _published(m["name"])
    if pub:
        lines += ["", "Published DeiT-S figures (`tokenbench/recipes/figures/published.csv`; `tokenbench figure` measures "
                  "the same settings):", "", "| setting | GFLOPs | top-1 % | source |", "|---|---|---|---|"]
        defaults = {q["name"]: q["default"] for q in m["params"]}
        for r in pub:
            params = json.loads(r["params"] or "{}")
            setting = ", ".join(f"{k}={json.dumps(v)}" for k, v in params.items()) or "–"
            if params and all(defaults.get(k) == v for k, v in params.items()):
                setting += " (the default)"
            lines.append(f"| {_cell(setting)} | {r['gflops']} | {r['top1'] or '–'} | {_cell(r['source'])} |")
    elif m["name"] != DENSE:
        lines += ["", "No published DeiT-S figure is recorded in `tokenbench/recipes/figures/published.csv`."]
    return "\n".join(lines) + "\n"


def reference_page(name: str) -> str:
    d = ROOT / "results" / name
    text = (d / "results.md").read_text()
    body = text.split("\n", 1)[1] if text.startswith("# ") else text
    lines = [f"# Reference results: `{name}`", "",
             f"Written by the tool from the records in `results/{name}/records/` (`tokenbench report results/{name}`"
             f" rewrites it; `report.html` beside it is the same report to explore).", ""]
    for png in sorted((d / "plots").glob("*.png")):
        lines += [f"![{png.stem}](../results/{name}/plots/{png.name})", ""]
    return "\n".join(lines) + body


def on_config(config):
    """Put the generated pages in the navigation."""
    names = [m["name"] for m in _methods()]
    sweeps = _sweeps()
    for i, item in enumerate(config["nav"]):
        if isinstance(item, dict) and "Methods" in item:
            config["nav"][i] = {"Methods": ["methods/index.md"] + [f"methods/{n}.md" for n in names]}
        if isinstance(item, dict) and "Reference results" in item:
            config["nav"][i] = {"Reference results": ["reference.md"] + [f"reference/{s}.md" for s in sweeps]}
    return config


def on_files(files, config):
    methods = _methods()
    prov = tomllib.loads((DOCS / "method_provenance.toml").read_text())
    flops_file = DOCS / "method_flops.json"
    counted = json.loads(flops_file.read_text()) if flops_file.exists() else {}
    from tokenbench.identity import method_code
    from tokenbench.registry import get_method

    counted = {k: v for k, v in counted.items() if k in {m["name"] for m in methods}
               and v.get("code") == method_code(get_method(k))}  # counts of other code are not shown
    files.append(File.generated(config, "methods/index.md", content=method_index(methods, prov)))
    for m in methods:
        files.append(File.generated(config, f"methods/{m['name']}.md", content=method_page(m, prov, counted)))
    for s in _sweeps():
        files.append(File.generated(config, f"reference/{s}.md", content=reference_page(s)))
    for png in sorted((ROOT / "results").rglob("*.png")):
        rel = png.relative_to(ROOT).as_posix()
        if "/records/" not in rel and "/cache/" not in rel:
            files.append(File.generated(config, rel, abs_src_path=str(png)))
    return files
