"""
Secrets (Hub tokens) kept out of everything hf_mtkd writes: the recorded training command and arguments file in the
model card, the pickled arguments (`training_args.bin`), logged arguments and reports.

One rule, `redact`: a value under a secret key (`token`, `hub_token`, ...) at any depth, a Hub access token
(`hf_...`) anywhere in a string, and the token of this environment (`HF_TOKEN`, or the one `hf auth login` stored)
wherever it appears, become `REDACTED`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from typing import Any

import yaml
from huggingface_hub import constants

REDACTED = "<redacted>"
SECRET_KEYS = frozenset(
    {"token", "hub_token", "use_auth_token", "hf_token", "push_to_hub_token", "access_token", "api_key", "password"}
)
"""Argument and keyword names whose values are secrets (compared in lower case)."""
HUB_TOKEN_PATTERN = re.compile(r"\bhf_[A-Za-z0-9]{16,}\b")
"""What a Hugging Face access token looks like, wherever it is written."""


def is_secret_key(key: object) -> bool:
    """Whether `key` (a dict key or an argument name, with or without leading dashes) names a secret."""
    return isinstance(key, str) and key.lstrip("-").lower() in SECRET_KEYS


def environment_secrets() -> list[str]:
    """The Hub tokens this process could use without being given one: `HF_TOKEN` and the one `hf auth login` stored."""
    tokens = [os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")]
    if os.path.isfile(constants.HF_TOKEN_PATH):
        with open(constants.HF_TOKEN_PATH, encoding="utf-8") as file:
            tokens.append(file.read())
    return [token.strip() for token in tokens if token and token.strip()]


def redact(value: Any, secrets: Sequence[str] = ()) -> Any:
    """
    `value` (a dict, list, tuple or string, nested at will; anything else is returned as is) with every secret
    replaced by `REDACTED`: values under secret keys, Hub tokens in strings, `secrets` and the environment's token.
    """
    known = [s for s in {*secrets, *environment_secrets()} if s]
    return _redact(value, sorted(known, key=len, reverse=True))


def _redact(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, dict):
        return {
            key: REDACTED if is_secret_key(key) and isinstance(item, str) and item else _redact(item, secrets)
            for key, item in value.items()
        }
    if type(value) in (list, tuple):
        return type(value)(_redact(item, secrets) for item in value)
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, REDACTED)
        return HUB_TOKEN_PATTERN.sub(REDACTED, value)
    return value


def redact_argv(args: Sequence[str]) -> list[str]:
    """
    Command-line arguments with secrets redacted: the value of a secret flag (`--hub_token X`, `--token=X`), the same
    value wherever else it occurs, secret keys inside a JSON argument (e.g. `--teacher_model_init_kwargs
    '{"token": ...}'`) and whatever `redact` catches.
    """
    secrets = []
    for i, arg in enumerate(args):
        name, equals, value = arg.partition("=")
        if arg.startswith("--") and is_secret_key(name):
            if equals:
                secrets.append(value)
            elif i + 1 < len(args):
                secrets.append(args[i + 1])
    return [_redact_json(redact(arg, secrets)) for arg in args]


def _redact_json(arg: str) -> str:
    """A JSON object argument with its secret keys redacted (unchanged when it has none, or is no JSON)."""
    if not arg.lstrip().startswith("{"):
        return arg
    try:
        parsed = json.loads(arg)
    except json.JSONDecodeError:
        return arg
    redacted = redact(parsed)
    return arg if redacted == parsed else json.dumps(redacted)


def redact_arguments_file(text: str, path: str) -> str:
    """
    The text of a .json/.yaml arguments file with its secrets redacted: written again from its parsed content when
    a secret key holds a value (JSON stays JSON), else the text itself with `redact` applied.
    """
    text = redact(text)
    try:
        parsed = yaml.safe_load(text)  # YAML reads JSON too
    except yaml.YAMLError:
        return text
    redacted = redact(parsed)
    if redacted == parsed:
        return text
    if path.endswith(".json"):
        return json.dumps(redacted, indent=2)
    return yaml.safe_dump(redacted, sort_keys=False)
