"""The product's jobs, one subpackage each, beside what two or more of them share.

    label/      the labelling job: plan -> read + decode -> SED -> encode -> shard writers -> commit
    evaluate/   benchmark evaluation under the paper's protocol (`sed-label eval`)
    train/      training and fine-tuning on Ray Train (`sed-label train`)
    report/     quality reports over a job's committed outputs (`sed-label report`)
    datasets/   the paper's benchmarks: registry, `sed-label prepare`, readers of label maps

Shared by the jobs: `storage` (fsspec, `OutputStore`) and `retry`; `sources` (input listing and
reads), `decode` (the one image decoder) and `read` (both, for a batch of plan rows); `taxonomy`,
`model_loading`, `preflight` and `infer` (the model step); `metrics` (the one confusion matrix);
`progress`; `process` (process-wide settings); `ray_stages`, the Ray plumbing, which with the jobs'
`run` modules is all that imports ray.
"""
