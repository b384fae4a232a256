"""Figures, the subjects they compare, medians with min and max, and ratios.

Pure data: no I/O, so the report can be tested with fake samples. A :class:`Figure` is one
quantity (``cold_start`` in seconds, ``io_seq_write`` in MiB/s, …) measured for several
subjects; each subject's :class:`Result` holds its raw samples, or the reason it was not
measured (``skipped``). Ratios are medians divided by the baseline's median (process
isolation, or the floor) within the same figure, so they stay meaningful on a noisy host.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

SUBJECTS = ("vm", "process", "runc", "oci", "floor")
"""Every subject, in display order."""

SUBJECT_LABELS = {
    "vm": "vmshim --isolation vm",
    "process": "vmshim --isolation process",
    "runc": "runc, OCI bundle",
    "oci": "vmshim-runtime, OCI bundle (microVM)",
    "floor": "bare QEMU boot (floor)",
    "cold": "vmshim, a VM booted for the container",
    "pooled": "vmshim, a pre-booted VM from the warm pool",
    "primed": "vmshim, a pooled VM primed for the image and network",
    "cold_nonet": "vmshim --network none, a VM booted for the container",
    "restored": "vmshim --network none, a copy of a snapshot template",
}

BASELINES = ("process", "floor")
"""Ratios are given against these two subjects, when the figure has them."""

RESULTS_VERSION = 1
"""Version of the results.json layout (bump when a field changes meaning)."""


@dataclass(frozen=True)
class Summary:
    """Median, min and max of a subject's samples, and how many there were."""

    median: float
    min: float
    max: float
    runs: int

    def to_dict(self) -> dict:
        return {"median": self.median, "min": self.min, "max": self.max, "runs": self.runs}


def summarize(samples: list[float]) -> Summary:
    """Summary of *samples*. Raises ValueError when there are none."""
    if not samples:
        raise ValueError("no samples to summarize")
    return Summary(statistics.median(samples), min(samples), max(samples), len(samples))


def ratio(value: float | None, baseline: float | None) -> float | None:
    """``value / baseline``, or None when either is missing or the baseline is not > 0."""
    if value is None or baseline is None or baseline <= 0:
        return None
    return value / baseline


@dataclass
class Result:
    """One subject's part of a figure: samples, or why there are none.

    ``extra`` holds details that explain the samples (the method used, per-step data of
    a density run, the guest's view); it goes to results.json as it is (JSON types only).
    """

    samples: list[float] = field(default_factory=list)
    skipped: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def summary(self) -> Summary | None:
        return summarize(self.samples) if self.samples else None

    @property
    def median(self) -> float | None:
        s = self.summary
        return s.median if s else None


@dataclass
class Figure:
    """One measured quantity for several subjects.

    ``higher_is_better`` says how to read it (throughput, density) — ratios are always
    ``subject / baseline``, so for such a figure a ratio below 1 means slower.
    """

    name: str
    title: str
    unit: str
    higher_is_better: bool = False
    note: str = ""
    subjects: dict[str, Result] = field(default_factory=dict)

    def result(self, subject: str) -> Result:
        """The subject's Result, made empty on first use."""
        return self.subjects.setdefault(subject, Result())

    def add(self, subject: str, value: float) -> None:
        self.result(subject).samples.append(float(value))

    def skip(self, subject: str, reason: str) -> None:
        """Record why *subject* has no figure. Samples taken so far are kept in extra
        (a failure halfway through must not pass for a complete measurement)."""
        r = self.result(subject)
        if r.samples:
            r.extra["partial_samples"] = list(r.samples)
            r.samples.clear()
        r.skipped = reason

    def ratio(self, subject: str, baseline: str) -> float | None:
        if subject == baseline or subject not in self.subjects or baseline not in self.subjects:
            return None
        return ratio(self.subjects[subject].median, self.subjects[baseline].median)

    def ordered(self) -> list[tuple[str, Result]]:
        """(subject, result) in SUBJECTS order, then any others."""
        known = [(s, self.subjects[s]) for s in SUBJECTS if s in self.subjects]
        return known + [(s, r) for s, r in self.subjects.items() if s not in SUBJECTS]

    def to_dict(self) -> dict:
        subjects = {}
        for name, r in self.ordered():
            entry: dict = {"samples": list(r.samples)}
            s = r.summary
            if s is not None:
                entry.update(s.to_dict())
                entry["ratios"] = {f"to_{b}": self.ratio(name, b) for b in BASELINES if self.ratio(name, b) is not None}
            if r.skipped is not None:
                entry["skipped"] = r.skipped
            if r.extra:
                entry["extra"] = r.extra
            subjects[name] = entry
        return {
            "title": self.title,
            "unit": self.unit,
            "higher_is_better": self.higher_is_better,
            "note": self.note,
            "subjects": subjects,
        }

    @classmethod
    def from_dict(cls, name: str, data: dict) -> Figure:
        fig = cls(
            name=name,
            title=data["title"],
            unit=data["unit"],
            higher_is_better=bool(data.get("higher_is_better")),
            note=data.get("note", ""),
        )
        for subject, entry in (data.get("subjects") or {}).items():
            fig.subjects[subject] = Result(
                samples=[float(v) for v in entry.get("samples", [])],
                skipped=entry.get("skipped"),
                extra=dict(entry.get("extra") or {}),
            )
        return fig


@dataclass
class Results:
    """A whole run: what was measured on which host (``meta``), and the figures."""

    meta: dict = field(default_factory=dict)
    figures: dict[str, Figure] = field(default_factory=dict)

    def figure(self, name: str, title: str, unit: str, higher_is_better: bool = False, note: str = "") -> Figure:
        """The named figure, created on first use."""
        if name not in self.figures:
            self.figures[name] = Figure(name, title, unit, higher_is_better, note)
        return self.figures[name]

    def to_dict(self) -> dict:
        return {
            "version": RESULTS_VERSION,
            "meta": self.meta,
            "figures": {name: fig.to_dict() for name, fig in self.figures.items()},
        }

    @classmethod
    def from_dict(cls, data: dict) -> Results:
        if data.get("version") != RESULTS_VERSION:
            raise ValueError(f"results version {data.get('version')!r} is not {RESULTS_VERSION}")
        return cls(
            meta=dict(data.get("meta") or {}),
            figures={n: Figure.from_dict(n, d) for n, d in (data.get("figures") or {}).items()},
        )
