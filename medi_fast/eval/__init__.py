"""Evaluation as a chain of named conversions: images (:mod:`.images`) -> features (:mod:`.features`,
:mod:`.inception`, the pathology encoders of :mod:`.encoders`) -> statistics and FID (:mod:`.fid`, one entry:
``compute_fid``) or an embeddings file (:mod:`.embed`: ``embed_images``; the file format: :mod:`.embeddings`)
-> linear probe (:mod:`.probe`: ``probe_table``) and shortcut meter (:mod:`.shortcut`: ``shortcut_report``).
See docs/eval.md."""
