"""TCGA barcodes: ``TCGA-05-4244-01Z-00-DX1`` = project, tissue source site (TSS), participant,
sample (type + vial), portion, slide.  The TSS is the hospital that submitted the slide: the
attribute MeDi conditions on, so it must be read as a string ("05" is not 5)."""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import MediFastError

# TSS codes and participant ids are 2 and 4 alphanumerics; the slide part (DX1, TS1, BS2, ...) varies.
_BARCODE = re.compile(
    r"^(?P<project>TCGA)-(?P<tss>[A-Z0-9]{2})-(?P<participant>[A-Z0-9]{4})"
    r"(?:-(?P<sample>\d{2}[A-Z]?)(?:-(?P<portion>\d{2}[A-Z]?)(?:-(?P<slide>[A-Z]{2}[A-Z0-9]*))?)?)?",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Barcode:
    tss: str
    participant: str
    sample: str | None
    portion: str | None
    slide: str | None

    @property
    def case(self) -> str:
        """The case (patient) barcode, e.g. TCGA-05-4244."""
        return f"TCGA-{self.tss}-{self.participant}"


def parse_barcode(text: str) -> Barcode:
    """Parse the leading TCGA barcode of ``text`` (a slide id or a patch file name)."""
    m = _BARCODE.match(str(text).strip())
    if m is None:
        raise MediFastError(f"{text!r} is not a TCGA barcode (expected e.g. TCGA-05-4244-01Z-00-DX1); "
                            f"name slide folders by their slide_submitter_id")
    g = m.groupdict()
    return Barcode(g["tss"].upper(), g["participant"].upper(), g["sample"], g["portion"], g["slide"])


def tss_of(text: str) -> str | None:
    """The tissue source site of a barcode, or None if ``text`` is not one."""
    m = _BARCODE.match(str(text).strip())
    return m.group("tss").upper() if m else None
