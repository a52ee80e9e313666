"""What goes to the Hub: whether a push can succeed (checked before any work), and leaving files of the output
directory out of `Trainer.push_to_hub`'s upload."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import transformers.trainer
from huggingface_hub import HfApi, is_offline_mode
from huggingface_hub.errors import HfHubHTTPError, HTTPError, LocalTokenNotFoundError


def check_push_access(repo_id: str, token: str | None = None) -> None:
    """
    Raise a one-line `ValueError` unless `repo_id` can be pushed to: not in offline mode (`HF_HUB_OFFLINE=1`), the Hub
    reachable, a valid token (`token`, else `HF_TOKEN` or the stored login) with write access to the repository's
    namespace (the token's user when `repo_id` has none). Meant to run before any expensive work, so a push that would
    fail does so at once instead of after training. Fine-grained tokens are checked by the upload itself.
    """
    flag = "--push_to_hub"
    if is_offline_mode():
        raise ValueError(
            f"{flag} cannot upload with HF_HUB_OFFLINE=1 set: unset HF_HUB_OFFLINE to push, or leave out {flag} (the "
            "student is saved in --output_dir either way)."
        )
    try:
        account = HfApi(token=token).whoami()
    except LocalTokenNotFoundError:
        raise ValueError(
            f"{flag} needs a Hub token with write access: log in with `hf auth login`, set HF_TOKEN or pass "
            "--hub_token."
        ) from None
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", None)
        problem = "refused the token as invalid" if status == 401 else f"answered {status} to the token check"
        raise ValueError(
            f"{flag}: the Hub {problem}; log in again with `hf auth login` or pass a valid --hub_token."
        ) from None
    except (OSError, HTTPError) as err:
        raise ValueError(
            f"{flag}: the Hub cannot be reached ({type(err).__name__}: {err}); check the network connection (and "
            f"HF_ENDPOINT), or leave out {flag}."
        ) from None
    role = account.get("auth", {}).get("accessToken", {}).get("role")
    if role == "read":
        raise ValueError(
            f"{flag}: the Hub token of {account['name']!r} is read-only; create one with write access "
            "(https://huggingface.co/settings/tokens) and log in with it or pass it as --hub_token."
        )
    namespace = repo_id.split("/")[0] if "/" in repo_id else account["name"]
    writable = [account["name"], *(org["name"] for org in account.get("orgs", []))]
    if namespace not in writable:
        raise ValueError(
            f"{flag}: {account['name']!r} cannot create {repo_id!r}, whose namespace {namespace!r} is neither the "
            f"user nor one of its organisations ({', '.join(writable)}); choose --hub_model_id in one of them."
        )


@contextlib.contextmanager
def ignored_on_upload(patterns: Sequence[str]) -> Iterator[None]:
    """
    Add `patterns` to the `ignore_patterns` of every `upload_folder` call the `Trainer` makes inside the block.

    `Trainer.push_to_hub` uploads its output directory with fixed `ignore_patterns`; this extends them without
    re-implementing it. The patterns travel with each call started inside the block, non-blocking ones included.
    Recent transformers upload through the shared `hf_api()` instance, older 5.x releases through the
    `upload_folder` function imported into `transformers.trainer`; both are covered.
    """

    def ignoring(upload_folder: Callable[..., Any]) -> Callable[..., Any]:
        def upload_folder_ignoring(*args: Any, ignore_patterns: list[str] | str | None = None, **kwargs: Any) -> Any:
            if isinstance(ignore_patterns, str):
                ignore_patterns = [ignore_patterns]
            return upload_folder(*args, ignore_patterns=[*(ignore_patterns or []), *patterns], **kwargs)

        return upload_folder_ignoring

    if hasattr(transformers.trainer, "hf_api"):
        owner = transformers.trainer.hf_api()
        shadowed = vars(owner).get("upload_folder")  # an instance attribute, e.g. from an enclosing block
    else:
        owner, shadowed = transformers.trainer, transformers.trainer.upload_folder
    owner.upload_folder = ignoring(owner.upload_folder)
    try:
        yield
    finally:
        if shadowed is None:
            del owner.upload_folder  # back to HfApi's method
        else:
            owner.upload_folder = shadowed
