"""results.json and results.md in the output directory: one section per report, merged across
runs, written atomically after every report.

A run replaces only the sections of the reports it ran; the others stay, each with the command
and time of the run that produced it. A file this version cannot merge (another schema, not
JSON) is moved aside under a dated name, never overwritten. Plots that a replaced section owned
and the new one does not are deleted; other PNG files in the directory that no section refers to
are listed in results.md, so nothing stale sits beside the results unmentioned.
"""
from __future__ import annotations

import datetime
import json
import pathlib

import reports
from reports import render

SCHEMA = 2
JSON_NAME, MD_NAME = "results.json", "results.md"


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


class Store:
    def __init__(self, out, run: dict):
        self.out = pathlib.Path(out)
        self.run = run  # this run's metadata: command, started, requested, allowed_missing, ...
        self.moved: list[str] = []
        self.doc = None

    # -- reading ----------------------------------------------------------------------------
    def _existing(self) -> dict | None:
        """The earlier results.json if this version can merge into it; else it (and its
        results.md) is moved aside and None is returned."""
        path = self.out / JSON_NAME
        if not path.exists():
            return None
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(doc, dict) and doc.get("tool") == "bn-compare" and doc.get("schema") == SCHEMA:
                return doc
        except (OSError, ValueError):
            pass
        stamp = datetime.datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y%m%d-%H%M%S")
        for name in (JSON_NAME, MD_NAME):
            p = self.out / name
            if p.exists():
                target = p.with_name(f"{p.stem}.{stamp}.unmerged{p.suffix}")
                p.rename(target)
                self.moved.append(target.name)
        return None

    def _doc(self) -> dict:
        if self.doc is None:
            earlier = self._existing() or {}
            self.doc = {"tool": "bn-compare", "schema": SCHEMA, "reports": {}, "backends": {},
                        **{k: v for k, v in earlier.items() if k not in ("run", "interrupted")}}
        return self.doc

    # -- writing ----------------------------------------------------------------------------
    def save_section(self, name: str, section: reports.Section, meta: dict) -> None:
        """Replace report `name`'s section and write both files."""
        doc = self._doc()
        old = doc["reports"].get(name) or {}
        for plot in set(old.get("plots") or []) - set(section.plots):
            (self.out / plot).unlink(missing_ok=True)
        doc["reports"][name] = {**meta, "failures": list(section.failures),
                                "status": "fail" if section.failures else "pass",
                                "plots": list(section.plots), "markdown": section.markdown}
        doc[name] = section.payload
        self.write()

    def write(self, *, interrupted: bool = False, finished: bool = False) -> None:
        doc = self._doc()
        run = dict(self.run, interrupted=interrupted)
        if finished or interrupted:
            run["finished"] = now()
        doc["run"], doc["interrupted"] = run, interrupted
        doc["failures"] = [f"{n}: {f}" for n in reports.ORDER if n in doc["reports"]
                           for f in doc["reports"][n]["failures"]]
        if self.moved:
            doc["run"]["moved_aside"] = self.moved
        render.write_atomic(self.out / JSON_NAME, render.to_json(doc))
        render.write_atomic(self.out / MD_NAME, self.markdown())

    def markdown(self) -> str:
        doc = self._doc()
        run = doc["run"]
        lines = ["# bn-compare results", ""]
        lines.append(f"Latest run: `{' '.join(run['command'][1:])}`, started {run['started']}"
                     + (", **interrupted**: only the reports below that say so are from it"
                        if run.get("interrupted") else "") + ".  ")
        host = run.get("host") or {}
        if host:
            lines.append(f"Host: {host.get('platform')}, Python {host.get('python')}, numpy "
                         f"{host.get('numpy')}, {host.get('cpus')} CPUs.")
        lines.append("")
        rows = []
        for n, b in doc["backends"].items():
            versions = ", ".join(f"{k} {v}" for k, v in (b.get("versions") or {}).items())
            state = "yes" if b.get("available") else "no: " + str(b.get("reason"))
            if not b.get("available") and n in (run.get("allowed_missing") or []):
                state += " (allowed by --allow-missing)"
            rows.append([n, state, versions])
        lines += [render.md_table(["backend", "available", "versions"], rows), ""]
        failures = doc["failures"]
        lines += (["**Checks that failed:**", "", *[f"- {f}" for f in failures], ""] if failures
                  else ["All checks in this file passed.", ""])
        for name in reports.ORDER:
            sec = doc["reports"].get(name)
            if sec is None:
                continue
            lines.append(sec["markdown"])
            if sec.get("run") != run.get("id"):
                lines.append(f"\n*From an earlier run: `{' '.join(sec['command'][1:])}`, "
                             f"started {sec['started']}.*")
            lines.append("")
        referenced = {p for s in doc["reports"].values() for p in (s.get("plots") or [])}
        strays = sorted(p.name for p in self.out.glob("*.png") if p.name not in referenced)
        if strays:
            lines += ["Files in this directory that no report above refers to (left by another "
                      "run or program): " + ", ".join(strays), ""]
        if self.moved:
            lines += ["An earlier results file this version cannot merge into was kept as: "
                      + ", ".join(self.moved), ""]
        return "\n".join(lines)
