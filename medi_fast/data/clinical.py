"""GDC clinical metadata: read with every code as a string, normalise missing markers, check columns.

GDC exports write a missing value as ``'--`` (the quote stops spreadsheets from reading a
formula); other sources use ``--``, ``Unknown`` or ``not reported``.  They all mean the same
thing, so they become one value, :data:`UNKNOWN`, or the (class, TSS, gender, race) combinations
would split one subpopulation into several.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from ..errors import MediFastError

UNKNOWN = "Unknown"
# The one home of "no value" spellings.  Two sets, on purpose:
# MISSING_MARKERS (compared lower-cased): what the index, the training tables and plans fold into
# UNKNOWN, including the answers "unknown" and "not reported" (one subpopulation, not three) and
# "nan" (pandas' spelling of a missing value turned into a string).
MISSING_MARKERS = frozenset({"'--", "--", "'--'", "", "??", "unknown", "not reported", "nan"})
# SPLIT_KEY_MISSING (compared as written): what the published split code writes as "Unknown" in a
# (tss, gender, race) key: GDC's '--, its variants and what pandas reads as NaN.  "not reported"
# stays a value of its own there: with it kept, the published holdout file is reproduced character
# for character.
SPLIT_KEY_MISSING = frozenset({"", "Unknown", "--", "'--", "'--'", "??", '"--', "'--\"", "nan", "NaN", "NA", "N/A",
                               "n/a", "NULL", "null", "None", "<NA>", "#N/A"})

# The clinical columns medi-fast uses (the GDC names found in tcga_ut_slide_metadata.csv).
REQUIRED_COLUMNS = ("project_id", "slide_submitter_id", "case_submitter_id", "tissue_source_site",
                    "gender", "race", "age_at_index")
CATEGORICAL_COLUMNS = ("gender", "race")


def is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or \
        str(value).strip().lower() in MISSING_MARKERS


def normalise_missing(values: Iterable) -> list[str]:
    """Every missing marker -> "Unknown"; other values stripped, kept as strings."""
    return [UNKNOWN if is_missing(v) else str(v).strip() for v in values]


def to_age(values: Iterable) -> np.ndarray:
    """Ages as float, NaN where missing or not a number."""
    out = pd.to_numeric(pd.Series([None if is_missing(v) else v for v in values], dtype=object), errors="coerce")
    return out.to_numpy(dtype=np.float64)


def read_csv_str(path) -> pd.DataFrame:
    """Read a CSV with every cell a string ("05" stays "05"; "'--" stays as written)."""
    from ..io import require_file

    path = require_file(path, "metadata file", "pass the GDC clinical CSV with --metadata")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise MediFastError(f"cannot read {path} as CSV ({(str(e).strip().splitlines() or [type(e).__name__])[0][:160]}); "
                            f"give a comma-separated file with a header row") from None


def check_columns(df: pd.DataFrame, required: Iterable[str], source) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise MediFastError(f"{source} has no column {', '.join(repr(c) for c in missing)}; "
                            f"add it (GDC clinical names: {', '.join(REQUIRED_COLUMNS)})")


def normalise_clinical(df: pd.DataFrame, source="metadata") -> pd.DataFrame:
    """A copy with the required columns checked and normalised: codes as strings, "Unknown" for any
    missing gender/race (a missing TSS is read from the slide barcode), ``age_at_index`` as float
    (NaN when missing), ``class`` = project code."""
    from ..vocab import canonical_class

    check_columns(df, REQUIRED_COLUMNS, source)
    out = df.copy()
    for col in ("project_id", "slide_submitter_id", "case_submitter_id"):
        out[col] = out[col].astype(str).str.strip()
    for col in ("tissue_source_site",) + CATEGORICAL_COLUMNS:
        out[col] = normalise_missing(out[col])
    # The barcode is the TSS's primary source.  Where the column lost it (a code such as "NA" read as a
    # missing value by some earlier tool: 11 TCGA-UCS slides in tcga_ut_slide_metadata.csv), take it back.
    lost = out["tissue_source_site"] == UNKNOWN
    if lost.any():
        from .barcode import tss_of

        slides = out.loc[lost, "slide_submitter_id"]
        out.loc[lost, "tissue_source_site"] = [tss_of(s) or UNKNOWN for s in slides]
    out["age_at_index"] = to_age(out["age_at_index"])
    out["class"] = [canonical_class(p) for p in out["project_id"]]
    return out


def read_clinical(path) -> pd.DataFrame:
    """Read and normalise a GDC clinical CSV (see :func:`normalise_clinical`)."""
    return normalise_clinical(read_csv_str(path), source=str(path))
