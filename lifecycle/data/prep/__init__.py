"""The steps of `llm data` (lifecycle/stages/data.py runs them in order; docs/data-prep.md describes them).

    text.py      pure per-document functions: normalisation, n-grams, PII scrubbing, the Gopher rules
    sources.py   the inputs: --source specs, files and digests, rows, evaluation items
    steps.py     the per-shard work that worker processes run
    shards.py    shard files and the step cache
    pipeline.py  the steps in order, the global decisions (which duplicate to keep, the mixture's draw)
    report.py    report.md and its plots

No module here imports torch.
"""
