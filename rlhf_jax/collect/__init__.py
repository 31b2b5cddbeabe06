"""Human preference collection: prompts -> k policy samples -> pairwise judgments -> JSONL.

    python -m rlhf_jax.collect generate --config=experiments/collect/review_world.py \
        --config.policy.path=QUICKSTART_DIR/sft --workdir=ROUND
    python -m rlhf_jax.collect add-annotator alice --db=ROUND/collect.db  # alice's login link
    python -m rlhf_jax.collect serve --db=ROUND/collect.db --port=8000   # annotators' page
    python -m rlhf_jax.collect stats --db=ROUND/collect.db               # agreement, kappa, bias
    python -m rlhf_jax.collect export --db=ROUND/collect.db --out=ROUND/preferences.jsonl
    python -m rlhf_jax.collect label --db=ROUND/collect.db --labeler=gold  # synthetic labels

Modules: `db` (the SQLite store, the queue rules, annotators' keys), `server` + `page` +
page.js (the annotation web app, signed into with per-annotator login links), `generate`
(sampling a round), `label` (gold / reward-model labellers), `report` (export and
statistics), `checkpoints` (params out of a stage's orbax checkpoint).
The exported file is read by `rlhf_jax.data.read_preferences` and so by the reward-model and
preference stages (`config.task.kind="files"`; see experiments/collect/reward_from_export.py).
"""
