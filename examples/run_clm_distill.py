"""
Distill one or more teacher causal LMs into a student on a text dataset: transformers' `run_clm.py`, with teachers.

    python examples/run_clm_distill.py \
        --teacher_model_name_or_path openai-community/gpt2-large openai-community/gpt2-medium \
        --model_name_or_path distilbert/distilgpt2 \
        --dataset_name Salesforce/wikitext --dataset_config_name wikitext-2-raw-v1 \
        --do_train --do_eval --do_generate_eval --output_dir distilgpt2-mtkd

`python examples/run_clm_distill.py --help` lists every argument; `hf-mtkd distill` is the same command. The code is
`hf_mtkd.run_clm_distill`.
"""

from hf_mtkd.run_clm_distill import main

if __name__ == "__main__":
    main()
