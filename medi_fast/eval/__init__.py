"""Evaluation as a chain of named conversions (DESIGN 4.6): images (:mod:`.images`) -> features
(:mod:`.features`, :mod:`.inception`, :mod:`.uni`) -> statistics and FID (:mod:`.fid`) or embeddings ->
linear probe (:mod:`.probe`) and shortcut meter (:mod:`.shortcut`).  See docs/eval.md."""
