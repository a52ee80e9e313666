"""
Chat distillation offline in about a minute on a CPU: three teachers with Llama-3-, ChatML (Qwen)- and Mistral-style
chat templates, each on its own tokenizer, teach a student with a ChatML template the assistant turns of a
conversational dataset in TRL's `messages` format, with one `hf-mtkd distill` command.

Usage: `python examples/chat_tiny.py [WORK_DIR [FLAG ...]]` (default: a new temporary directory). It writes the
data, the tokenizers (each given its chat template here) and the briefly fitted teachers under WORK_DIR, then runs
the command it prints, with any further flags appended (e.g. `--alpha_kd 0 --alpha_ce 1` for the student trained on
the assistant turns alone, without teachers' distributions).
"""

import json
import os
import shlex
import sys
import tempfile

from hf_mtkd.run_clm_distill import main as distill
from hf_mtkd.testing import chat_tokenizer, fit_causal_lm, synthetic_conversations, tiny_causal_lm

TEACHERS = [  # name, chat template style, tokenizer algorithm and size, architecture
    ("llama3-style", "llama3", "bpe", 300, "llama"),
    ("qwen-style", "chatml", "bpe", 280, "qwen2"),
    ("mistral-style", "mistral", "wordpiece", 200, "mistral"),
]


def main(work_dir: str, extra: list[str]) -> None:
    os.makedirs(work_dir, exist_ok=True)
    conversations = synthetic_conversations(400, seed=0)
    data = {"train": conversations[:360], "validation": conversations[360:]}
    for split, rows in data.items():
        with open(os.path.join(work_dir, f"{split}.jsonl"), "w") as f:
            f.writelines(json.dumps({"messages": messages}) + "\n" for messages in rows)
    teacher_dirs = []
    for k, (name, style, algorithm, size, architecture) in enumerate(TEACHERS):
        tokenizer = chat_tokenizer(data["train"], style, size, algorithm)
        texts = [tokenizer.apply_chat_template(messages, tokenize=False) for messages in data["train"]]
        model = tiny_causal_lm(architecture, tokenizer, seed=10 + k, hidden_size=48, num_layers=2)
        fit_causal_lm(model, tokenizer, texts, steps=80, max_length=96, seed=k)
        path = os.path.join(work_dir, name)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)  # with its chat template
        teacher_dirs.append(path)
    student_tokenizer = chat_tokenizer(data["train"], "chatml", 512, "bpe")
    student_dir = os.path.join(work_dir, "student")
    tiny_causal_lm("qwen2", student_tokenizer, seed=1, hidden_size=32).save_pretrained(student_dir)
    student_tokenizer.save_pretrained(student_dir)

    args = [
        "--teacher_model_name_or_path", *teacher_dirs, "--model_name_or_path", student_dir,
        "--train_file", os.path.join(work_dir, "train.jsonl"),
        "--validation_file", os.path.join(work_dir, "validation.jsonl"),
        "--do_train", "--do_eval", "--output_dir", os.path.join(work_dir, "distilled"),
        "--max_steps", "80", "--per_device_train_batch_size", "8", "--learning_rate", "3e-3", "--block_size", "96",
        "--logging_steps", "20", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "--seed", "0",
        *extra,
    ]  # fmt: skip
    print("hf-mtkd distill " + shlex.join(args))
    distill(args, prog="hf-mtkd distill")
    with open(os.path.join(work_dir, "distilled", "all_results.json")) as f:
        results = json.load(f)
    print({key: round(value, 3) for key, value in results.items() if key.startswith(("eval_", "perplexity"))})


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(), sys.argv[2:])
