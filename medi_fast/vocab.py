"""Vocabularies: ordered names for one conditioning attribute, and the TCGA-UT project aliases.

Codes are strings: the tissue source site "05" is not the integer 5.  Lookups accept what users
type for a cancer type (``LUAD``, ``TCGA-LUAD``, ``Lung_adenocarcinoma``) and fail with the
closest valid names.

Every name is also a path component: ``generate`` files images under
``OUT/<class>/<value>/<class>_<value>..._<index>.png``, so a vocabulary refuses names that could
leave that folder or that a file system cannot hold (``check_name``), wherever it is built: from
options, from a reference run's mapping files, or from a model file read from disk.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from .errors import MediFastError, suggest

# The 32 TCGA-UT projects: code -> folder name used by the TCGA-UT patch dataset.
TCGA_PROJECTS: dict[str, str] = {
    "ACC": "Adrenocortical_carcinoma",
    "BLCA": "Bladder_Urothelial_Carcinoma",
    "BRCA": "Breast_invasive_carcinoma",
    "CESC": "Cervical_squamous_cell_carcinoma_and_endocervical_adenocarcinoma",
    "CHOL": "Cholangiocarcinoma",
    "COAD": "Colon_adenocarcinoma",
    "DLBC": "Lymphoid_Neoplasm_Diffuse_Large_B-cell_Lymphoma",
    "ESCA": "Esophageal_carcinoma",
    "GBM": "Glioblastoma_multiforme",
    "HNSC": "Head_and_Neck_squamous_cell_carcinoma",
    "KICH": "Kidney_Chromophobe",
    "KIRC": "Kidney_renal_clear_cell_carcinoma",
    "KIRP": "Kidney_renal_papillary_cell_carcinoma",
    "LGG": "Brain_Lower_Grade_Glioma",
    "LIHC": "Liver_hepatocellular_carcinoma",
    "LUAD": "Lung_adenocarcinoma",
    "LUSC": "Lung_squamous_cell_carcinoma",
    "MESO": "Mesothelioma",
    "OV": "Ovarian_serous_cystadenocarcinoma",
    "PAAD": "Pancreatic_adenocarcinoma",
    "PCPG": "Pheochromocytoma_and_Paraganglioma",
    "PRAD": "Prostate_adenocarcinoma",
    "READ": "Rectum_adenocarcinoma",
    "SARC": "Sarcoma",
    "SKCM": "Skin_Cutaneous_Melanoma",
    "STAD": "Stomach_adenocarcinoma",
    "TGCT": "Testicular_Germ_Cell_Tumors",
    "THCA": "Thyroid_carcinoma",
    "THYM": "Thymoma",
    "UCEC": "Uterine_Corpus_Endometrial_Carcinoma",
    "UCS": "Uterine_Carcinosarcoma",
    "UVM": "Uveal_Melanoma",
}


# Longer than any TCGA value (the longest, a site of resection, has 74 characters), short enough that
# a file name made of a class and a few values stays under the usual 255-byte limit.
MAX_NAME_LENGTH = 128


class UnsafeName(MediFastError):
    """A name that cannot be a single path component.  ``problem`` says why, without the fix, so a
    loader can say which file holds it."""

    def __init__(self, problem: str, fix: str):
        super().__init__(f"{problem}; {fix}")
        self.problem = problem


def name_problem(name: str, *, attribute: bool = False) -> str | None:
    """Why ``name`` cannot name a folder or file (None when it can).

    Attribute names are also keys of the model's embedding tables, which cannot hold a ".".
    """
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not text"
    if not name.strip():
        return "is empty"
    if name in (".", ".."):
        return "is a relative path component"
    if "/" in name or "\\" in name:
        return "contains a path separator (/ or \\)"
    if not name.isprintable():
        return "contains a control or non-printable character"
    if len(name) > MAX_NAME_LENGTH:
        return f"is {len(name)} characters long (at most {MAX_NAME_LENGTH})"
    if attribute and "." in name:
        return "contains a '.'"
    return None


def check_name(name, what: str, *, attribute: bool = False,
               fix: str = "use letters, digits, spaces, - and _") -> str:
    """``name`` if it is a safe single path component, else UnsafeName naming ``what`` it is."""
    problem = name_problem(name, attribute=attribute)
    if problem is not None:
        shown = repr(name) if len(str(name)) <= 40 else repr(str(name)[:40]) + "..."
        raise UnsafeName(f"{what} {shown} {problem}", fix)
    return name


def _key(name: str) -> str:
    return str(name).strip().lower().replace("-", "_").replace(" ", "_")


_ALIASES: dict[str, str] = {}
for _code, _folder in TCGA_PROJECTS.items():
    for _alias in (_code, "TCGA-" + _code, _folder, _folder.replace("_", " ")):
        _ALIASES[_key(_alias)] = _code


def project_code(name: str) -> str | None:
    """The TCGA project code for any accepted spelling, or None if it is not a TCGA-UT project."""
    return _ALIASES.get(_key(name))


def canonical_class(name: str) -> str:
    """Map a TCGA project spelling to its code; leave other names (e.g. synthetic classes) as given."""
    return project_code(name) or str(name).strip()


@dataclass(frozen=True)
class Vocabulary:
    """Ordered names of one attribute; the id of a name is its position.

    The null id (used for conditioning dropout and classifier-free guidance) is ``len(vocab)``.
    """

    name: str
    names: tuple[str, ...]
    # Class vocabularies resolve TCGA aliases; metadata vocabularies (TSS codes) do not.
    tcga_aliases: bool = False

    def __post_init__(self):
        object.__setattr__(self, "names", tuple(str(n) for n in self.names))
        check_name(self.name, "attribute name", attribute=True)
        for n in self.names:
            check_name(n, f"{self.name} value")
        if len(set(self.names)) != len(self.names):
            dup = sorted({n for n in self.names if self.names.count(n) > 1})
            raise MediFastError(f"vocabulary {self.name!r} has duplicate names {dup}; give each value once")
        if not self.names:
            raise MediFastError(f"vocabulary {self.name!r} is empty; give at least one value")

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self):
        return iter(self.names)

    @property
    def null_id(self) -> int:
        return len(self.names)

    def id(self, value) -> int:
        """The id of ``value``; raises MediFastError naming the closest valid names."""
        value = str(value).strip()
        index = {n: i for i, n in enumerate(self.names)}
        if value in index:
            return index[value]
        if self.tcga_aliases:
            code = project_code(value)
            if code is not None:
                for i, n in enumerate(self.names):
                    if project_code(n) == code:
                        return i
        hint = suggest(value, self.names)
        if not hint and len(self.names) <= 12:
            hint = " (valid: " + ", ".join(self.names) + ")"
        raise MediFastError(f"unknown {self.name} {value!r}{hint}; pick one the model was trained with")

    def ids(self, values: Iterable) -> list[int]:
        return [self.id(v) for v in values]

    @classmethod
    def from_values(cls, name: str, values: Sequence, *, tcga_aliases: bool = False) -> "Vocabulary":
        """Unique values in order of first appearance (codes kept as strings)."""
        seen: dict[str, None] = {}
        for v in values:
            seen.setdefault(str(v).strip(), None)
        return cls(name, tuple(seen), tcga_aliases)

    def to_dict(self) -> dict:
        return {"name": self.name, "names": list(self.names), "tcga_aliases": self.tcga_aliases}

    @classmethod
    def from_dict(cls, d: dict) -> "Vocabulary":
        return cls(d["name"], tuple(d["names"]), bool(d.get("tcga_aliases", False)))


def parse_list(text: str) -> list[str]:
    """'LUAD, LUSC' -> ['LUAD', 'LUSC'] (codes stay strings)."""
    return [t.strip() for t in str(text).split(",") if t.strip()]
