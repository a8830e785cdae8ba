"""`medi-fast demo`: the whole method end to end on built-in synthetic H&E data, on a CPU.

Like the CLI, the demo orchestrates: it is the one part of the library besides `cli` that imports
`training` and `engines` (lazily, inside its stages).

* `stages.py`: the setting (cohort, probe pool, test sites, `DemoConfig`) and each stage as a function;
* `run.py`: the orchestrator (`run_demo`): output directory, the stages in order, timings;
* `figures.py` and `report.py`: the pictures and `report.md` + `report.html`.
"""
from .run import OUTPUTS, prepare_out, run_demo
from .stages import CLASSES, COHORT, PROBE_POOL, TEST_SITES, DemoConfig

__all__ = ["CLASSES", "COHORT", "OUTPUTS", "PROBE_POOL", "TEST_SITES", "DemoConfig", "prepare_out", "run_demo"]
