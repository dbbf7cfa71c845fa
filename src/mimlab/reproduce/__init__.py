"""`mimlab reproduce`: the whole study in one command — data, pretraining, probe, transfer, claim-by-claim report.

Modules: `presets` (StudyConfig, presets, config files), `stages` (content-addressed stage cache), `pipeline`
(the stages in order), `claims` (the verdict rules, pure functions), `report` (summary.json, tables, report.html).
"""
