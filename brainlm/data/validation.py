"""Great Expectations suites for a cohort: the one module that imports great_expectations.

Two tables are validated on every ingest:
- participants (participants.tsv): `participant_id` present, non-null, unique; age in 0–120, scores ≥ 0,
  known sex codes; numeric columns really numeric. Missing values ("n/a") are allowed.
- recordings (one row of statistics per stored array): parcel count equals the atlas's, timepoints ≥ the
  minimum, finite values only, float32, per-parcel median ≈ 0 and IQR ≈ 1 after scaling, unique recordings
  and checksums (no duplicate data), every participant known.

The GX context is ephemeral (nothing written but what is asked for); results are saved as data docs (HTML) and
raw JSON into the folder the caller gives (ingest: the run report, `<home>/.brainlm/validation/<cohort>/`,
outside the versioned store, since they carry run ids and times).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import great_expectations as gx
import great_expectations.expectations as gxe
import pandas as pd
from great_expectations.data_context.types.base import ProgressBarsConfig

DOCS_SITE = "cohort"
SCALE_TOLERANCE = 1e-3  # |median| and |IQR − 1| after robust scaling (float32 rounding is ~1e-7)
MAX_AGE = 120
SEX_CODES = ("M", "F", "O", "m", "f", "o", "male", "female", "other", "Male", "Female", "Other",
             "MALE", "FEMALE", "OTHER")  # BIDS participants.tsv spellings; "n/a" is read as missing
NUMERIC_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                  "float32", "float64", "Int64", "Float64")
RECORDING_STATS = ("recording", "participant", "parcels", "timepoints", "n_nonfinite", "dtype",
                   "median_abs_max", "iqr_min", "iqr_max", "checksum")


@dataclass(frozen=True)
class Failure:
    """One failed expectation: which rows (positions in the validated table) broke it, and how."""

    expectation: str
    column: str | None
    rows: list[int]
    detail: str


@dataclass(frozen=True)
class SuiteResult:
    suite: str
    success: bool
    evaluated: int
    failures: list[Failure]

    def line(self) -> str:
        passed = self.evaluated - len(self.failures)
        return f"{self.suite}: {passed}/{self.evaluated} expectations passed"


@dataclass
class ValidationSummary:
    """All suites run for one cohort, and where their data docs are."""

    suites: list[SuiteResult] = field(default_factory=list)
    docs: Path | None = None

    @property
    def success(self) -> bool:
        return all(s.success for s in self.suites)

    def lines(self) -> list[str]:
        out = []
        for suite in self.suites:
            out.append(suite.line())
            out += [f"  FAILED {f.expectation}({f.column or ''}): {f.detail}" for f in suite.failures]
        if self.docs is not None:
            out.append(f"data docs: {self.docs}")
        return out


class CohortValidator:
    """One ephemeral GX context per ingest; `build_docs` renders the suites run into `docs_dir`."""

    def __init__(self, docs_dir: str | Path):
        self.docs_dir = Path(docs_dir)
        self.docs_dir.mkdir(parents=True, exist_ok=True)
        self.context = gx.get_context(mode="ephemeral")
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False)
        # The ephemeral context comes with a docs site in a fresh /tmp folder: drop it, or every ingest
        # would leave a 4 MB site there. Ours lives in `docs_dir`.
        for site in list(self.context.list_data_docs_sites()):
            self.context.delete_data_docs_site(site)
        self.context.add_data_docs_site(
            DOCS_SITE,
            {
                "class_name": "SiteBuilder",
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(self.docs_dir)},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
        self.source = self.context.data_sources.add_pandas("brainlm")
        self.summary = ValidationSummary(docs=self.docs_dir / "index.html")

    def participants(self, frame: pd.DataFrame, score_columns: tuple[str, ...]) -> SuiteResult:
        """participants.tsv: identifiers, then ranges and codes for the known phenotype columns present."""
        expectations = [
            gxe.ExpectColumnToExist(column="participant_id"),
            gxe.ExpectColumnValuesToNotBeNull(column="participant_id"),
            gxe.ExpectColumnValuesToBeUnique(column="participant_id"),
        ]
        if "age" in frame.columns:
            expectations += [
                gxe.ExpectColumnValuesToBeInTypeList(column="age", type_list=list(NUMERIC_DTYPES)),
                gxe.ExpectColumnValuesToBeBetween(column="age", min_value=0, max_value=MAX_AGE),
            ]
        if "sex" in frame.columns:
            expectations.append(gxe.ExpectColumnValuesToBeInSet(column="sex", value_set=list(SEX_CODES)))
        for column in (c for c in score_columns if c in frame.columns):
            expectations += [
                gxe.ExpectColumnValuesToBeInTypeList(column=column, type_list=list(NUMERIC_DTYPES)),
                gxe.ExpectColumnValuesToBeBetween(column=column, min_value=0),
            ]
        return self._run("participants", frame, expectations)

    def recordings(
        self, stats: pd.DataFrame, n_parcels: int, min_timepoints: int, participants: list[str] | None
    ) -> SuiteResult:
        """The stored arrays' statistics (columns RECORDING_STATS, one row per recording)."""
        expectations = [
            gxe.ExpectTableColumnsToMatchSet(column_set=list(RECORDING_STATS), exact_match=True),
            gxe.ExpectTableRowCountToBeBetween(min_value=1),
            gxe.ExpectColumnValuesToBeUnique(column="recording"),
            gxe.ExpectColumnValuesToBeUnique(column="checksum"),
            gxe.ExpectColumnValuesToBeBetween(column="parcels", min_value=n_parcels, max_value=n_parcels),
            gxe.ExpectColumnValuesToBeBetween(column="timepoints", min_value=min_timepoints),
            gxe.ExpectColumnValuesToBeBetween(column="n_nonfinite", min_value=0, max_value=0),
            gxe.ExpectColumnValuesToBeInSet(column="dtype", value_set=["float32"]),
            gxe.ExpectColumnValuesToBeBetween(column="median_abs_max", min_value=0, max_value=SCALE_TOLERANCE),
            gxe.ExpectColumnValuesToBeBetween(
                column="iqr_min", min_value=1 - SCALE_TOLERANCE, max_value=1 + SCALE_TOLERANCE
            ),
            gxe.ExpectColumnValuesToBeBetween(
                column="iqr_max", min_value=1 - SCALE_TOLERANCE, max_value=1 + SCALE_TOLERANCE
            ),
        ]
        if participants is not None:
            expectations.append(gxe.ExpectColumnValuesToBeInSet(column="participant", value_set=participants))
        return self._run("recordings", stats, expectations)

    def build_docs(self) -> Path:
        """Render every suite run so far into the data docs site; returns its index.html."""
        self.context.build_data_docs(site_names=[DOCS_SITE])
        return self.docs_dir / "index.html"

    def _run(self, name: str, frame: pd.DataFrame, expectations: list) -> SuiteResult:
        """Validate `frame`; the result is kept in the context (for the docs) and saved as JSON."""
        batch = self.source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
        suite = self.context.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
        definition = self.context.validation_definitions.add(
            gx.ValidationDefinition(name=name, data=batch, suite=suite)
        )
        result = definition.run(
            batch_parameters={"dataframe": frame.reset_index(drop=True)}, result_format="COMPLETE"
        )
        (self.docs_dir / f"{name}.json").write_text(json.dumps(result.to_json_dict(), indent=1, default=str))
        out = SuiteResult(
            suite=name,
            success=bool(result.success),
            evaluated=len(result.results),
            failures=[_failure(r) for r in result.results if not r.success],
        )
        self.summary.suites.append(out)
        return out


def _failure(r) -> Failure:
    """A GX ExpectationValidationResult as a Failure with the rows and values that broke it."""
    config = r.expectation_config
    column = config.kwargs.get("column")
    res = r.result or {}
    if r.exception_info and r.exception_info.get("raised_exception"):
        detail = f"could not be evaluated: {r.exception_info.get('exception_message')}"
    elif res.get("unexpected_list") is not None:
        values = list(dict.fromkeys(map(str, res["unexpected_list"])))
        detail = f"{res.get('unexpected_count', len(values))} unexpected value(s): {values[:10]}"
    else:
        detail = f"observed {res.get('observed_value')!r}"
    bounds = {k: config.kwargs[k] for k in ("min_value", "max_value", "value_set") if k in config.kwargs}
    if len(bounds.get("value_set", [])) > 10:
        bounds["value_set"] = [*bounds["value_set"][:10], "..."]
    if bounds:
        detail += f" (expected {bounds})"
    return Failure(
        expectation=config.type,
        column=column,
        rows=[int(i) for i in res.get("unexpected_index_list") or []],
        detail=detail,
    )
