"""Failures that used to come late or raw: each is one line that names the problem and the fix, before any work."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import huggingface_hub.constants
import pytest
from datasets import Dataset
from test_run_clm_distill import QUICK, isolated_logging

from hf_mtkd import MultiTeacherDistillationConfig, MultiTeacherDistillationTrainer
from hf_mtkd.run_clm_distill import main
from hf_mtkd.teachers import load_teachers

TOKEN = "hf_" + "Test" * 9


class FakeHub(BaseHTTPRequestHandler):
    """A Hub on loopback that answers the token check (`/api/whoami-v2`) with `status` and `account`."""

    status, account = 200, {}

    def do_GET(self):
        body = json.dumps(self.account if self.status == 200 else {"error": "Invalid credentials"}).encode()
        self.send_response(self.status if self.path == "/api/whoami-v2" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def online_hub(monkeypatch):
    """Online mode, with the Hub endpoint at a loopback server whose answers the test sets."""
    server = HTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setattr(FakeHub, "status", 200)
    yield FakeHub
    server.shutdown()
    server.server_close()
    thread.join()


def push_error(tmp_path, text_files, capsys, *extra: str) -> str:
    """The error of `--push_to_hub` runs, with a teacher that does not exist: a check made after loading the
    teachers (or the data, or the cache) would report the teacher instead."""
    args = [
        "--teacher_model_name_or_path", str(tmp_path / "no-such-teacher"), "--train_file", text_files["txt"][0],
        "--do_train", "--output_dir", str(tmp_path / "my-student"), "--push_to_hub", *extra, *QUICK,
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info, isolated_logging():
        main(args)
    assert exit_info.value.code == 2
    assert not (tmp_path / "my-student").exists()
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_push_to_hub_offline_is_refused_at_once(tmp_path, text_files, capsys, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert push_error(tmp_path, text_files, capsys) == (
        "python -m hf_mtkd.run_clm_distill: error: --push_to_hub cannot upload with HF_HUB_OFFLINE=1 set: unset "
        "HF_HUB_OFFLINE to push, or leave out --push_to_hub (the student is saved in --output_dir either way)."
    )


def test_push_to_hub_to_an_unreachable_hub_is_refused_at_once(tmp_path, text_files, capsys, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused
    line = push_error(tmp_path, text_files, capsys, "--hub_token", TOKEN)
    assert "error: --push_to_hub: the Hub cannot be reached (ConnectError: " in line
    assert line.endswith("); check the network connection (and HF_ENDPOINT), or leave out --push_to_hub.")


@pytest.mark.parametrize(
    ("status", "account", "hub_model_id", "message"),
    [
        (401, {}, None, "the Hub refused the token as invalid; log in again with `hf auth login` or pass a valid "
         "--hub_token."),
        (200, {"name": "me", "orgs": [], "auth": {"accessToken": {"role": "read"}}}, None,
         "the Hub token of 'me' is read-only; create one with write access (https://huggingface.co/settings/tokens) "
         "and log in with it or pass it as --hub_token."),
        (200, {"name": "me", "orgs": [{"name": "lab"}], "auth": {"accessToken": {"role": "write"}}}, "other/student",
         "'me' cannot create 'other/student', whose namespace 'other' is neither the user nor one of its "
         "organisations (me, lab); choose --hub_model_id in one of them."),
    ],
    ids=["invalid-token", "read-only-token", "foreign-namespace"],
)  # fmt: skip
def test_push_to_hub_without_write_access_is_refused_at_once(
    status, account, hub_model_id, message, online_hub, tmp_path, text_files, capsys
):
    online_hub.status, online_hub.account = status, account
    extra = ["--hub_token", TOKEN, *(["--hub_model_id", hub_model_id] if hub_model_id else [])]
    assert push_error(tmp_path, text_files, capsys, *extra).endswith(f"error: --push_to_hub: {message}")


@pytest.mark.parametrize("hub_model_id", [None, "lab/student"])
def test_push_to_hub_with_write_access_goes_on(hub_model_id, online_hub, tmp_path, text_files, capsys):
    online_hub.account = {"name": "me", "orgs": [{"name": "lab"}], "auth": {"accessToken": {"role": "write"}}}
    extra = ["--hub_token", TOKEN, *(["--hub_model_id", hub_model_id] if hub_model_id else [])]
    assert "error: Teacher " in push_error(tmp_path, text_files, capsys, *extra)  # past the check, to the teacher


def test_a_missing_teacher_path_in_the_python_api(tmp_path, make_student, dataset, tokenizer):
    message = (
        f"Teacher '{tmp_path / 'nothing'}' cannot be loaded: it is neither a local directory nor a valid Hub model "
        "id. Give a local directory holding a model (config.json and weights) or a Hub model id (reachable online, "
        "or cached when HF_HUB_OFFLINE=1)."
    )
    with pytest.raises(ValueError) as error:
        load_teachers([str(tmp_path / "nothing")])
    assert str(error.value) == message
    args = MultiTeacherDistillationConfig(output_dir=str(tmp_path / "out"), report_to="none")
    with pytest.raises(ValueError) as error:
        MultiTeacherDistillationTrainer(
            model=make_student(), teachers=[str(tmp_path / "nothing")], args=args, train_dataset=dataset
        )
    assert str(error.value) == message
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"^Teacher '.*empty' cannot be loaded: .*config\.json"):
        load_teachers([str(tmp_path / "empty")])


def test_raw_text_with_teachers_that_share_the_tokenizer(tmp_path, make_student, teacher_dirs, corpus, tokenizer):
    args = MultiTeacherDistillationConfig(output_dir=str(tmp_path), report_to="none", max_steps=1)
    raw = Dataset.from_dict({"text": corpus[:16]})
    with pytest.raises(ValueError) as error:
        MultiTeacherDistillationTrainer(
            model=make_student(), teachers=teacher_dirs[:1], args=args, train_dataset=raw, processing_class=tokenizer
        )
    assert str(error.value) == (
        "The dataset has no 'input_ids' column (it has ['text']), but teachers that share the student's tokenizer "
        "read token ids: tokenize it first, e.g. `dataset.map(lambda batch: tokenizer(batch['text']), batched=True, "
        "remove_columns=['text'])`, or set `cross_tokenizer='always'` to distill on the raw text."
    )


@pytest.mark.parametrize("weights", ["0.5,0.5", ["0.5", "0.5"], [True, False]])
def test_teacher_weights_that_are_not_numbers(weights, tmp_path):
    with pytest.raises(ValueError) as error:
        MultiTeacherDistillationConfig(output_dir=str(tmp_path), report_to="none", teacher_weights=weights)
    assert str(error.value) == (
        f"`teacher_weights` must be a list of numbers, one per teacher (e.g. [0.5, 0.5]), got {weights!r}."
    )
