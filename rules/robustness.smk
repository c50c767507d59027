rule robustness:
    """Resampling stability of χ_bench/χ_model (the paper's resamples) and predictive validity of the χ_model
    gaps on held-out items, from the same shards as reduce_concepts: a table, a JSON summary and a figure
    (PNG + SVG; the PNGs are in `snakemake --report report.html`, category Robustness) for each check."""
    input:
        saliency=expand(
            f"{RESULTS}/extract/model={{model}}/benchmark={{benchmark}}/layer={{layer}}/saliency.parquet",
            benchmark=BENCHMARKS,
            allow_missing=True,
        ),
        tokens=expand(
            f"{RESULTS}/extract/model={{model}}/benchmark={{benchmark}}/layer={{layer}}/item_tokens.parquet",
            benchmark=BENCHMARKS,
            allow_missing=True,
        ),
        scores=expand(
            f"{RESULTS}/evaluate/model={{model}}/benchmark={{benchmark}}/scores.parquet",
            benchmark=BENCHMARKS,
            allow_missing=True,
        ),
        sae_cfg=f"{RESULTS}/sae/model={{model}}/layer={{layer}}/cfg.json",
        labels=f"{RESULTS}/labels/model={{model}}/layer={{layer}}/labels.parquet",
    output:
        stability=f"{RESULTS}/robustness/model={{model}}/layer={{layer}}/stability.parquet",
        stability_summary=f"{RESULTS}/robustness/model={{model}}/layer={{layer}}/stability.json",
        validity=f"{RESULTS}/robustness/model={{model}}/layer={{layer}}/validity.parquet",
        validity_summary=f"{RESULTS}/robustness/model={{model}}/layer={{layer}}/validity.json",
        markdown=f"{RESULTS}/robustness/model={{model}}/layer={{layer}}/robustness.md",
        stability_figure=report(
            f"{RESULTS}/robustness/model={{model}}/layer={{layer}}/stability.png",
            caption="../report/stability.rst",
            category="Robustness",
            subcategory="model {model}, layer {layer}",
            labels={"figure": "resampling stability of χ_bench and χ_model"},
        ),
        validity_figure=report(
            f"{RESULTS}/robustness/model={{model}}/layer={{layer}}/validity.png",
            caption="../report/validity.rst",
            category="Robustness",
            subcategory="model {model}, layer {layer}",
            labels={"figure": "predictive validity of the χ_model gaps"},
        ),
        svg=expand(
            f"{RESULTS}/robustness/model={{model}}/layer={{layer}}/{{figure}}.svg",
            figure=["stability", "validity"],
            allow_missing=True,
        ),
    params:
        spec=lambda wc: spec_json(config, "robustness"),
        out_dir=lambda wc, output: os.path.dirname(output.stability),
        sae_dir=lambda wc, input: os.path.dirname(input.sae_cfg),
    conda:
        "../envs/competency-gaps.yaml"
    log:
        f"{RESULTS}/logs/robustness/model={{model}}/layer={{layer}}.log",
    benchmark:
        f"{RESULTS}/benchmarks_runtime/robustness/model={{model}}/layer={{layer}}.tsv"
    resources:
        # The shards stream through in batches, a few passes: memory follows the SAE's width and the resamples,
        # not the rows (bench/reduce.py --stages robustness, 65,536 concepts: peak RSS 1.28, 1.45 and 1.72 GiB at
        # 7, 70 and 210 million rows).
        mem_mb=4000,
        runtime=30,
    shell:
        "python -m competency_gaps robustness --spec {params.spec:q} --sae-dir {params.sae_dir} --saliency {input.saliency} "
        "--tokens {input.tokens} --scores {input.scores} --labels {input.labels} --out-dir {params.out_dir} --figures "
        "--title 'model {wildcards.model}, layer {wildcards.layer}' 2> {log}"
