# competency-gaps: SAE concept coverage of benchmarks (χ_bench) and concept-level model performance (χ_model).
# Loads and validates the config, includes the rule modules in pipeline order, and defines `all`.
# Run: snakemake --cores 2   (README.md has set-up, GPU and cluster instructions)

from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


include: "rules/common.smk"


envvars:
    "PATH",


wildcard_constraints:
    model=alternatives(MODELS),
    benchmark=alternatives(BENCHMARKS),
    layer=r"\d+",


include: "rules/benchmarks.smk"
include: "rules/models.smk"
include: "rules/evaluate.smk"
include: "rules/sae.smk"
include: "rules/extract.smk"
include: "rules/labels.smk"
include: "rules/concepts.smk"
include: "rules/robustness.smk"
include: "rules/figures.smk"
include: "rules/explorer.smk"
include: "rules/compare.smk"


rule all:
    input:
        all_targets(),
    default_target: True
