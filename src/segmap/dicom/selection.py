"""Pick the series a task needs, with the rules of a Segmentation Task file.

The rules have the shape of MONAI Deploy's ``DICOMSeriesSelectorOperator``::

    {"selections": [{"name": "CT Series", "conditions": {"Modality": "(?i)CT", "ImageType": ["PRIMARY", "!LOCALIZER"]}},
                    ...]}

Selections are tried in order and the first one that matches any series wins; the conditions of one selection are
AND-ed. A condition's key is a DICOM keyword; how its value is compared depends on the attribute's type in the DICOM
data dictionary (not on whatever one file happens to hold):

- ``"ImageOrientationPatient": "Axial" | "Coronal" | "Sagittal"`` (any case): the slice normal
  (row cosine x column cosine) points mostly along the patient's foot-head, anterior-posterior or left-right axis.
  The orientation is a fact of the patient coordinate system, so PatientPosition is neither needed nor consulted.
- Numeric attributes (VR DS, IS, US, SS, UL, SL, FL, FD, ...): a number means equality; ``[min, max]`` an inclusive
  range; ``[v, ">"|">="|"<"|"<="|"!="]`` a comparison; a list of another length equality value by value (e.g. all
  six numbers of ImageOrientationPatient); a string is compared as a number when it is one, else as a regular
  expression that must match the whole number as text (``format(v, "g")``). For an attribute with several values
  (PixelSpacing), ranges and comparisons must hold for every value.
- Single-valued text attributes (SeriesDescription, Modality, ...): case-insensitive equality, else
  ``re.search(value, attribute, re.IGNORECASE)`` (unanchored; ``^``/``$`` anchor it, ``(?i)`` is accepted).
- Multi-valued text attributes (ImageType, ...), or any text attribute given a list: every listed term must equal
  (case-insensitively) one of the attribute's values, and a term written ``"!TERM"`` must equal none of them.

How the defects of the original are fixed:

- Every instance counts, not the first one: a series satisfies a condition when **every one of its instances**
  does (each distinct value is checked once). A series whose ImageType says LOCALIZER on one slice therefore fails
  ``["!LOCALIZER"]``.
- Missing values: a missing or empty text attribute is the empty string (``"(.*?)"`` matches it, ``"CT"`` does not),
  a missing multi-valued attribute has no terms (``"!X"`` holds, ``"X"`` does not), a missing numeric attribute or
  ImageOrientationPatient matches nothing. Numeric ``0`` is a value like any other, in the file and in the rule.
- Only image series are candidates: SEG, SR, RT objects, presentation and key-object states and other objects
  without rows/columns are never selected, whatever the rules say (they cannot be segmented).
- A rule segmap cannot apply (unknown keyword, sequence attribute, bad operator, invalid regular expression) raises
  :class:`~segmap.errors.TaskFileError` naming the selection and the condition, before any series is looked at.
- Nothing matching raises :class:`~segmap.errors.InputError` with what was looked for and what was found.
- Several series matching one selection: the choice does not depend on the file system. The series with the most
  images (frames) wins, then the lowest Series Number (a missing number counts last), then the smallest Series
  Instance UID; the others are logged and kept in :attr:`SeriesSelection.alternatives`.

- A 4D series (phases, echoes at the same positions) offers each stack as a candidate of its own; two stacks of one
  series matching one selection is refused with the condition that would pick one (:mod:`segmap.dicom.stacks`).
- Candidates in several studies are refused, and the series chosen for one task must share one study, one patient
  and one frame of reference (:mod:`segmap.dicom.studies`); a run splits a multi-study input by study first.
- :attr:`SeriesSelection.passed_over` lists every other series with the reason it was not chosen (logged too,
  :func:`passed_over`); the reason a matching series lost is told by the same ranking that chose
  (:func:`_preference`).

Several modalities (:func:`select_for_task`): each modality gets its own series. Among all the ways of giving the
modalities distinct series, the one that prefers the modalities in task order is taken: the first modality gets its
best match, the second its best among the rest, ..., backtracking when a later modality would be left without a
series. One series serves two modalities only when no distinct assignment exists (e.g. both rules can only match
the same series); that is logged as a warning, since it is usually a mistake in the rules.
"""

from __future__ import annotations

import logging
import math
import operator
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

from pydicom.datadict import dictionary_VM, dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from ..errors import InputError, TaskFileError
from .loading import DicomScan, DicomSeries
from .stacks import refuse_ambiguous_stacks
from .studies import check_one_study, refuse_several_studies

log = logging.getLogger(__name__)

ORIENTATIONS = ("Sagittal", "Coronal", "Axial")  # by dominant axis of the slice normal: x (L-R), y (A-P), z (F-H)
_NUMERIC_VRS = {"DS", "IS", "US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"}
_UNSUPPORTED_VRS = {"SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN"}
_COMPARISONS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le, "!=": operator.ne,
}
#: Series listed in a no-match message before the rest are only counted.
MAX_LISTED_SERIES = 20
#: Candidates listed per modality in the report before the rest are only counted.
MAX_PASSED_OVER = 50


@dataclass(frozen=True)
class SeriesSelection:
    """The series chosen for one modality and why."""

    modality_key: str
    series: DicomSeries
    #: ``name`` of the selection that matched (``"selection N"`` when the rule has no name) and its index.
    selection_name: str
    selection_index: int
    conditions: Mapping[str, Any]
    #: Other series that matched the same selection, in order of preference (not chosen).
    alternatives: tuple[DicomSeries, ...] = ()
    #: True when this series also serves another modality because nothing else matched (see :func:`select_for_task`).
    shared: bool = False
    #: The other series of the scan, each with why it was not chosen for this modality (see
    #: :func:`passed_over`); filled by :func:`select_for_task`.
    passed_over: tuple[dict, ...] = ()


def select_series(scan: DicomScan, rules: Mapping[str, Any], *, modality_key: str = "image") -> SeriesSelection:
    """The series of ``scan`` that ``rules`` select for ``modality_key`` (see the module docstring for the rules).

    Raises :class:`~segmap.errors.TaskFileError` for a rule that cannot be applied and
    :class:`~segmap.errors.InputError` when no series matches.
    """
    selections = _compile_rules(rules, modality_key)
    ranked = _ranked_matches(scan, selections, modality_key)
    series, index = ranked[0]
    return _make_selection(modality_key, selections[index], series, ranked)


def select_for_task(scan: DicomScan, modality_rules: Mapping[str, Mapping[str, Any]]) -> dict[str, SeriesSelection]:
    """One series per modality key (keys in task order), distinct where possible (see the module docstring)."""
    compiled = {key: _compile_rules(rules, key) for key, rules in modality_rules.items()}
    options = {key: _ranked_matches(scan, sels, key) for key, sels in compiled.items()}
    refuse_several_studies(scan, [s for ranked in options.values() for s, _ in ranked])
    keys = list(options)

    chosen = _distinct_assignment([[s for s, _ in options[k]] for k in keys])
    shared_uids: set[str] = set()
    if chosen is None:
        chosen = []
        for k in keys:
            free = [s for s, _ in options[k] if s not in chosen]
            chosen.append(free[0] if free else options[k][0][0])
        counts: dict[str, list[str]] = {}
        for k, s in zip(keys, chosen):
            counts.setdefault(s.series_instance_uid, []).append(k)
        for uid, ks in counts.items():
            if len(ks) > 1:
                shared_uids.add(uid)
                log.warning("modalities %s all select the same series %s: their rules match no other series",
                            ", ".join(repr(k) for k in ks), uid)

    result = {}
    for k, s in zip(keys, chosen):
        index = next(i for t, i in options[k] if t is s)
        result[k] = _make_selection(k, compiled[k][index], s, options[k],
                                    shared=s.series_instance_uid in shared_uids)
    return _with_passed_over(scan, result)


def _with_passed_over(scan: DicomScan, result: dict[str, SeriesSelection]) -> dict[str, SeriesSelection]:
    check_one_study(result)
    notes = passed_over(scan, result)
    return {k: replace(sel, passed_over=tuple(notes[k])) for k, sel in result.items()}


# ---- compiled rules


@dataclass
class _Condition:
    keyword: str
    rule: Any
    #: Tests the values one instance holds for the keyword (a tuple, empty when missing).
    test: Callable[[tuple], bool]
    numeric: bool

    def matches(self, series: DicomSeries) -> bool:
        distinct = {_values(inst.dataset, self.keyword, self.numeric) for inst in series.instances}
        return all(self.test(v) for v in distinct)

    def describe(self) -> str:
        return f"{self.keyword}={self.rule!r}"


@dataclass
class _Selection:
    index: int
    name: str
    rule: Mapping[str, Any]
    conditions: list[_Condition] = field(default_factory=list)

    def matches(self, series: DicomSeries) -> bool:
        return all(c.matches(series) for c in self.conditions)

    def describe(self) -> str:
        return f"'{self.name}' ({', '.join(c.describe() for c in self.conditions)})"


class SelectionRules(dict):
    """A modality's Rules_Text: the parsed JSON document (this dict), compiled once into :attr:`selections`.

    Made when the task file is loaded, so a rule segmap cannot apply (bad regular expression, unknown keyword or
    operator) is reported then, by ``segmap validate`` too, not first by a DICOM run.
    """

    def __init__(self, doc: Mapping[str, Any], modality_key: str) -> None:
        super().__init__(doc)
        self.modality_key = modality_key
        self.selections = _compile_rules(doc, modality_key)


def _compile_rules(rules: Mapping[str, Any], modality_key: str) -> list[_Selection]:
    if isinstance(rules, SelectionRules):
        return rules.selections
    where = f"series-selection rules of modality '{modality_key}'"
    if rules is None:
        raise TaskFileError(f"modality '{modality_key}' has no Rules_Text (series-selection rules); DICOM input "
                            "needs them")
    selections = rules.get("selections") if isinstance(rules, Mapping) else None
    if not isinstance(selections, Sequence) or isinstance(selections, str) or not selections:
        raise TaskFileError(f"{where}: expected {{\"selections\": [{{\"name\": ..., \"conditions\": {{...}}}}]}}")
    compiled = []
    for i, sel in enumerate(selections):
        conditions = sel.get("conditions") if isinstance(sel, Mapping) else None
        name = str(sel.get("name") or f"selection {i + 1}") if isinstance(sel, Mapping) else f"selection {i + 1}"
        if not isinstance(conditions, Mapping) or not conditions:
            raise TaskFileError(f"{where}, selection '{name}': 'conditions' must be a non-empty mapping of DICOM "
                                "keyword -> value")
        s = _Selection(i, name, conditions)
        for keyword, value in conditions.items():
            try:
                s.conditions.append(_compile_condition(str(keyword), value))
            except ValueError as e:
                raise TaskFileError(f"{where}, selection '{name}', condition '{keyword}': {e}") from None
        compiled.append(s)
    return compiled


def _compile_condition(keyword: str, rule: Any) -> _Condition:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise ValueError("not a DICOM attribute keyword (e.g. 'SeriesDescription', 'Modality')")
    vr, vm = dictionary_VR(tag), dictionary_VM(tag)
    if any(v in _UNSUPPORTED_VRS for v in vr.split(" or ")):
        raise ValueError(f"attributes of VR {vr} cannot be compared; use a text or numeric attribute")
    _check_scalars(rule)
    numeric = any(v in _NUMERIC_VRS for v in vr.split(" or "))
    if keyword == "ImageOrientationPatient" and isinstance(rule, str):
        return _Condition(keyword, rule, _orientation_test(rule), numeric=True)
    if numeric:
        return _Condition(keyword, rule, _numeric_test(rule), numeric=True)
    if vm == "1" and isinstance(rule, str):
        return _Condition(keyword, rule, _text_test(rule), numeric=False)
    terms = rule if isinstance(rule, list) else [rule]
    return _Condition(keyword, rule, _terms_test(terms), numeric=False)


def _check_scalars(rule: Any) -> None:
    items = rule if isinstance(rule, list) else [rule]
    if isinstance(rule, list) and not rule:
        raise ValueError("an empty list selects nothing; give at least one value")
    for v in items:
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise ValueError(f"values must be strings or numbers, got {type(v).__name__}")


def _compile_regex(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern, re.IGNORECASE)
    except re.error as e:
        raise ValueError(f"{pattern!r} is not a valid regular expression ({e})") from None


def _text_test(rule: str) -> Callable[[tuple], bool]:
    regex = _compile_regex(rule)
    folded = rule.casefold()

    def test(values: tuple) -> bool:
        text = values[0] if values else ""
        return text.casefold() == folded or regex.search(text) is not None

    return test


def _term_equals(term: str | int | float, value: str) -> bool:
    if isinstance(term, str):
        return value.casefold() == term.casefold()
    try:
        return float(value) == float(term)
    except ValueError:
        return False


def _terms_test(terms: list) -> Callable[[tuple], bool]:
    wanted = [t for t in terms if not (isinstance(t, str) and t.startswith("!"))]
    banned = [t[1:] for t in terms if isinstance(t, str) and t.startswith("!")]

    def test(values: tuple) -> bool:
        def present(term) -> bool:
            return any(_term_equals(term, v) for v in values)
        return all(present(t) for t in wanted) and not any(present(t) for t in banned)

    return test


def _as_number(v: Any) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    try:
        return float(str(v))
    except ValueError:
        return None


def _numeric_test(rule: Any) -> Callable[[tuple], bool]:
    def every(pred: Callable[[float], bool]) -> Callable[[tuple], bool]:
        return lambda values: bool(values) and all(v is not None and pred(v) for v in values)

    if isinstance(rule, list):
        if len(rule) == 2 and isinstance(rule[1], str):
            op = _COMPARISONS.get(rule[1].strip())
            bound = _as_number(rule[0])
            if op is None or bound is None:
                raise ValueError(f"{rule!r} is not a comparison; expected [number, op] with op one of "
                                 f"{', '.join(_COMPARISONS)}")
            return every(lambda v: op(v, bound))
        numbers = [_as_number(v) for v in rule]
        if any(n is None for n in numbers):
            raise ValueError(f"{rule!r}: expected [min, max], [number, op] or a list of numbers")
        if len(numbers) == 2:
            lo, hi = numbers
            if lo > hi:  # type: ignore[operator]
                raise ValueError(f"range {rule!r} is empty (min > max)")
            return every(lambda v: lo <= v <= hi)  # type: ignore[operator]

        def elementwise(values: tuple) -> bool:
            return len(values) == len(numbers) and all(
                v is not None and math.isclose(v, n, rel_tol=1e-6, abs_tol=1e-6) for v, n in zip(values, numbers))
        return elementwise
    number = _as_number(rule)
    if number is not None:
        return every(lambda v: v == number)
    regex = _compile_regex(rule)
    return every(lambda v: regex.fullmatch(format(v, "g")) is not None)


def _orientation_test(rule: str) -> Callable[[tuple], bool]:
    wanted = rule.strip().capitalize()
    if wanted not in ORIENTATIONS:
        raise ValueError(f"{rule!r} is not an orientation; expected one of {', '.join(ORIENTATIONS)}")

    def test(values: tuple) -> bool:
        return len(values) == 6 and all(v is not None for v in values) and orientation_of(values) == wanted

    return test


def orientation_of(iop: Sequence[float]) -> str | None:
    """"Axial", "Coronal" or "Sagittal" for an ImageOrientationPatient value (None if degenerate)."""
    row, col = [float(v) for v in iop[:3]], [float(v) for v in iop[3:6]]
    normal = (row[1] * col[2] - row[2] * col[1], row[2] * col[0] - row[0] * col[2], row[0] * col[1] - row[1] * col[0])
    magnitudes = [abs(n) for n in normal]
    if max(magnitudes) == 0:
        return None
    return ORIENTATIONS[magnitudes.index(max(magnitudes))]


def _values(ds: Dataset, keyword: str, numeric: bool) -> tuple:
    """The attribute's values in one instance as a hashable tuple: text (stripped) or float; () when missing."""
    value = ds.get(keyword)
    if value is None or value == "":
        return ()
    items = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    if numeric:
        return tuple(_as_number(v) for v in items)
    return tuple(str(v).strip() for v in items)


# ---- choosing


def _images(series: DicomSeries) -> int:
    return sum(inst.number_of_frames for inst in series.instances)


def _preference(series: DicomSeries) -> tuple:
    """The ranking among series matching one selection (smaller first): the most images, then the lowest Series
    Number (a missing number counts last), then the smallest Series Instance UID."""
    number = series.series_number
    return (-_images(series), 0 if number is not None else 1, number or 0, series.series_instance_uid)


def _why_preferred(chosen: DicomSeries, other: DicomSeries) -> str:
    """Which criterion of :func:`_preference` put ``chosen`` before ``other``."""
    mine, theirs = _preference(chosen), _preference(other)
    if mine[0] != theirs[0]:
        return f"the chosen series has more images ({_images(chosen)} > {_images(other)})"
    if mine[1:3] != theirs[1:3]:
        return f"the chosen series has the lower Series Number ({chosen.series_number} < {other.series_number})"
    return "the chosen series has the smaller Series Instance UID"


def _ranked_matches(scan: DicomScan, selections: list[_Selection], modality_key: str) -> list[tuple[DicomSeries, int]]:
    """Matching series in order of preference: by selection, then by :func:`_preference`; each series once."""
    candidates = [s for s in scan.series if s.is_image]
    ranked: list[tuple[DicomSeries, int]] = []
    seen: set[int] = set()
    for sel in selections:
        for s in sorted((s for s in candidates if sel.matches(s)), key=_preference):
            if id(s) not in seen:
                seen.add(id(s))
                ranked.append((s, sel.index))
    if not ranked:
        raise InputError(_no_match_message(scan, selections, modality_key))
    return ranked


def _distinct_assignment(options: list[list[DicomSeries]], budget: int = 100_000) -> list[DicomSeries] | None:
    """The first distinct choice (one series per list) in preference order, or None if there is none."""
    chosen: list[DicomSeries] = []
    steps = 0

    def search(i: int) -> bool:
        nonlocal steps
        if i == len(options):
            return True
        for s in options[i]:
            steps += 1
            if steps > budget:
                return False
            if any(s is c for c in chosen):
                continue
            chosen.append(s)
            if search(i + 1):
                return True
            chosen.pop()
        return False

    return list(chosen) if search(0) else None


def _make_selection(key: str, sel: _Selection, series: DicomSeries, ranked: list[tuple[DicomSeries, int]],
                    shared: bool = False) -> SeriesSelection:
    alternatives = tuple(s for s, i in ranked if i == sel.index and s is not series)
    refuse_ambiguous_stacks(key, series, alternatives)
    log.info("modality '%s': selection '%s' chose %s", key, sel.name, series.summary())
    if alternatives:
        log.info("modality '%s': %d other series also matched '%s' (%s); chose the one with the most images, then "
                 "the lowest Series Number, then the smallest UID", key, len(alternatives), sel.name,
                 "; ".join(s.summary() for s in alternatives[:5]))
    return SeriesSelection(key, series, sel.name, sel.index, dict(sel.rule), alternatives, shared)


def passed_over(scan: DicomScan, selections: Mapping[str, SeriesSelection]) -> dict[str, list[dict]]:
    """For each modality key, the series of ``scan`` not chosen for it and why (for the run report and the log).

    Each entry: ``series_instance_uid``, ``summary`` (modality, number, description, stack, instance count; never
    patient data) and ``reason``: chosen for another modality, not an image series, matched too but another was
    preferred (and by which rule), or the first condition it fails. At most :data:`MAX_PASSED_OVER` per modality,
    then one entry counting the rest.
    """
    chosen_for = {id(sel.series): key for key, sel in selections.items()}
    out: dict[str, list[dict]] = {}
    for key, sel in selections.items():
        entries = []
        for series in scan.series:
            if series is sel.series:
                continue
            if id(series) in chosen_for:
                reason = f"chosen for modality '{chosen_for[id(series)]}'"
            else:
                reason = _why_not(series, sel)
            entries.append({"series_instance_uid": series.series_instance_uid, "summary": series.summary(),
                            "reason": reason})
            log.info("modality '%s': passed over %s: %s", key, series.summary(), reason)
        if len(entries) > MAX_PASSED_OVER:
            entries = entries[:MAX_PASSED_OVER] + [{"more": len(entries) - MAX_PASSED_OVER}]
        out[key] = entries
    return out


def _why_not(series: DicomSeries, sel: SeriesSelection) -> str:
    if not series.is_image:
        return "not an image series"
    if any(a is series for a in sel.alternatives):
        return f"matched '{sel.selection_name}' too, but {_why_preferred(sel.series, series)}"
    failing = _failing_condition(series, sel.conditions)
    return failing or f"matches only a selection tried after '{sel.selection_name}'"


def _failing_condition(series: DicomSeries, conditions: Mapping[str, Any]) -> str | None:
    for keyword, rule in conditions.items():
        try:
            if not _compile_condition(str(keyword), rule).matches(series):
                return f"does not match {keyword}={rule!r}"
        except ValueError:
            return None
    return None


def _no_match_message(scan: DicomScan, selections: list[_Selection], key: str) -> str:
    looked = " or ".join(sel.describe() for sel in selections)
    listed = []
    for s in scan.series[:MAX_LISTED_SERIES]:
        n = len(s.instances)
        note = "" if s.is_image else ", not an image series"
        listed.append(f"{s.modality or '?'} {s.description!r} ({n} instance{'s' if n != 1 else ''}{note})")
    if len(scan.series) > MAX_LISTED_SERIES:
        listed.append(f"and {len(scan.series) - MAX_LISTED_SERIES} more")
    found = "; ".join(listed) if listed else "none"
    return (f"no DICOM series in {scan.folder} matches the rules for modality '{key}': looked for {looked}; "
            f"found {len(scan.series)} series: {found}")
