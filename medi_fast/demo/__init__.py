"""`medi-fast demo`: the whole method end to end on built-in synthetic H&E data, on a CPU.

Like the CLI, the demo orchestrates: it is the one part of the library besides `cli` that imports
`training` and `engines` (lazily, inside its stages).

* `stages.py`: the settings (cohort, probe pool, test sites: `Setting`, `SETTINGS`), `DemoConfig` and each
  stage as a function;
* `arms.py`: the arms the linear probe is compared on (`REGISTRY`): each one's name, the recipe that makes
  its training data, its colour and label; everything else iterates over it;
* `stain.py`: the stain transforms of the arms a pathology user would pick instead of generating (HED
  jitter, Macenko augmentation, Macenko and Reinhard normalisation);
* `run.py`: the orchestrator (`run_demo`): output directory, the stages in order, timings; `run_seeds`
  runs it once per seed; `reevaluate` scores a finished run again with other probe settings;
* `figures.py` and `report.py`: the pictures and `report.md` + `report.html`; `seeds.py`: the report
  over seeds (mean and spread).
"""
from .run import OUTPUTS, prepare_out, run_demo, run_seeds
from .stages import DEFAULT_SETTING, SETTINGS, DemoConfig, Setting

__all__ = ["DEFAULT_SETTING", "OUTPUTS", "SETTINGS", "DemoConfig", "Setting", "prepare_out", "run_demo", "run_seeds"]
