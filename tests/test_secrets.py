"""No Hub token reaches a file hf_mtkd writes, however it was given: flags, a JSON argument, an arguments file, the
environment. The run keeps the token in memory (it needs it to push)."""

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_run_clm_distill import run_subprocess

from hf_mtkd import MultiTeacherDistillationConfig
from hf_mtkd.redaction import REDACTED, redact, redact_arguments_file, redact_argv

HUB_TOKEN = "hf_" + "Flag0Token" * 4  # the shape of a real Hub token
TOKEN = "hf_" + "Model1Token" * 3
INIT_TOKEN = "plain-init-kwargs-secret"  # not token-shaped: found by its key alone
FILE_TOKEN = "hf_" + "File2Token" * 4
ENV_TOKEN = "environment-secret-value"


def files_holding(root: Path, secrets: list[str]) -> dict[str, list[str]]:
    """Every file under `root` that holds one of `secrets`, read as bytes, with the secrets it holds."""
    found = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        held = [secret for secret in secrets if secret.encode() in data]
        if held:
            found[str(path.relative_to(root))] = held
    return found


def flags(arguments: dict) -> list[str]:
    """`arguments` as command-line flags."""
    out = []
    for key, value in arguments.items():
        out += [f"--{key}", *(str(v) for v in (value if isinstance(value, list) else [value]))]
    return out


def test_redaction_of_arguments_files_and_nested_values(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", ENV_TOKEN)
    argv = [
        "--hub_token", "abc", "--token=def", "--hub_model_id", "me/x", "--teacher_model_init_kwargs",
        json.dumps({"token": "ghi", "revision": "main"}), "--output_dir", f"out-{ENV_TOKEN}", "--seed", HUB_TOKEN,
    ]  # fmt: skip
    assert redact_argv(argv) == [
        "--hub_token", REDACTED, "--token=" + REDACTED, "--hub_model_id", "me/x", "--teacher_model_init_kwargs",
        json.dumps({"token": REDACTED, "revision": "main"}), "--output_dir", f"out-{REDACTED}", "--seed", REDACTED,
    ]  # fmt: skip
    assert redact({"a": [{"token": "x", "pad_token_id": 0}, ("hub_token", "abc")], "use_auth_token": True}) == {
        "a": [{"token": REDACTED, "pad_token_id": 0}, ("hub_token", "abc")],  # a key, not a value, names the secret
        "use_auth_token": True,  # no secret in a flag
    }
    arguments = {"teacher_model_name_or_path": ["t"], "hub_token": "abc", "teacher_model_init_kwargs": {"token": "d"}}
    for name, text in (("a.json", json.dumps(arguments)), ("a.yaml", yaml.safe_dump(arguments))):
        redacted = redact_arguments_file(text, name)
        assert "abc" not in redacted and '"d"' not in redacted and ": d" not in redacted
        assert (json.loads if name.endswith("json") else yaml.safe_load)(redacted) == {
            "teacher_model_name_or_path": ["t"],
            "hub_token": REDACTED,
            "teacher_model_init_kwargs": {"token": REDACTED},
        }
    plain = "seed: 0\noutput_dir: out  # a comment\n"
    assert redact_arguments_file(plain, "a.yaml") == plain  # left as written when it holds no secret


def test_pickled_and_logged_arguments_hold_no_secret_but_the_run_keeps_it(tmp_path):
    args = MultiTeacherDistillationConfig(
        output_dir=str(tmp_path), report_to="none", hub_token=HUB_TOKEN, teacher_model_init_kwargs={"token": TOKEN}
    )
    torch.save(args, tmp_path / "training_args.bin")
    loaded = torch.load(tmp_path / "training_args.bin", weights_only=False)
    assert loaded.hub_token == REDACTED and loaded.teacher_model_init_kwargs == {"token": REDACTED}
    assert files_holding(tmp_path, [HUB_TOKEN, TOKEN]) == {}
    for text in (str(args), repr(args), args.to_json_string(), json.dumps(args.to_sanitized_dict())):
        assert HUB_TOKEN not in text and TOKEN not in text
    assert args.hub_token == HUB_TOKEN and args.teacher_model_init_kwargs == {"token": TOKEN}  # still there to push
    for copied in (copy.copy(args), copy.deepcopy(args)):
        assert copied.hub_token == HUB_TOKEN and copied.teacher_model_init_kwargs == {"token": TOKEN}


@pytest.mark.parametrize("given_as", ["flags", "arguments_file"])
def test_no_file_or_log_of_a_run_holds_a_token(given_as, tmp_path, teacher_dirs, student_dir, text_files):
    """A real run (teacher-logits cache, training, card) with tokens in every form: no written file and no log line
    holds one; the recorded command shows where they were, redacted."""
    secrets = [HUB_TOKEN, TOKEN, INIT_TOKEN, FILE_TOKEN, ENV_TOKEN]
    train, _ = text_files["txt"]
    output_dir, cache = tmp_path / "out", tmp_path / "cache"
    common = {
        "teacher_model_name_or_path": [teacher_dirs[0]],
        "model_name_or_path": student_dir,
        "train_file": train,
        "teacher_logits_cache": str(cache),
        "teacher_logits_top_k": 4,
        "do_train": True,
        "output_dir": str(output_dir),
        "max_steps": 2,
        "save_strategy": "steps",
        "save_steps": 1,  # checkpoints, with their own training_args.bin and trainer_state.json
        "block_size": 32,
        "per_device_train_batch_size": 4,
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "log_level": "info",
    }
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_TOKEN", ENV_TOKEN)
        if given_as == "flags":
            args = [
                *flags(common), "--hub_token", HUB_TOKEN, f"--token={TOKEN}",
                "--teacher_model_init_kwargs", json.dumps({"token": INIT_TOKEN}),
            ]  # fmt: skip
        else:
            path = tmp_path / "args.yaml"
            arguments = {**common, "hub_token": FILE_TOKEN, "teacher_model_init_kwargs": {"token": INIT_TOKEN}}
            path.write_text(yaml.safe_dump(arguments, sort_keys=False))
            args = [str(path)]
        result = run_subprocess(sys.executable, "-m", "hf_mtkd.cli", "distill", *args)
    logs = result.stdout + result.stderr
    assert result.returncode == 0, logs[-3000:]
    assert "Training/evaluation parameters" in logs  # the arguments were logged, redacted
    assert (output_dir / "checkpoint-1" / "training_args.bin").is_file()
    assert (cache / "train" / "manifest.json").is_file()
    for written in (output_dir, cache):  # card, training_args.bin, trainer_state.json, results, cache manifests
        assert files_holding(written, secrets) == {}
    assert [secret for secret in secrets if secret in logs] == []
    loaded = torch.load(output_dir / "training_args.bin", weights_only=False)
    assert loaded.hub_token == REDACTED and loaded.teacher_model_init_kwargs["token"] == REDACTED
    card = (output_dir / "README.md").read_text()
    command = card.split("## Training command\n\n```bash\n")[1].split("\n```")[0]
    if given_as == "flags":
        assert f"--hub_token '{REDACTED}' '--token={REDACTED}'" in command
        assert '--teacher_model_init_kwargs \'{"token": "<redacted>"}\'' in command
    else:
        assert f"# hub_token: {REDACTED}" in command and f"#   token: {REDACTED}" in command
        assert "# teacher_logits_top_k: 4" in command  # the rest of the file as it was
