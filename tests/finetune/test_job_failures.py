"""What a tenant reads about a failed job: a code and a plain sentence, never the exception."""

from __future__ import annotations

import pytest
from mlflow.exceptions import MlflowException

from finetune.job import TrainingFileError, describe_failure
from registry.storage import StorageError

INTERNAL = "http://10.0.3.7:9000/brandfarm/tenants/acme/files/file-1.zip"


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (
            StorageError(f"get tenants/acme/files/x failed on {INTERNAL}: SlowDown"),
            "storage_unavailable",
        ),
        (
            MlflowException(f"API request to {INTERNAL} failed with ConnectionError"),
            "registry_unavailable",
        ),
        (
            ConnectionError(f"HTTPConnectionPool(host='10.0.3.7'): {INTERNAL}"),
            "registry_unavailable",
        ),
        (
            RuntimeError(f"data-parallel training failed: RayTaskError at {INTERNAL}"),
            "training_failed",
        ),
        (KeyError("/var/lib/brandfarm/models/x/unet/config.json"), "training_failed"),
    ],
)
def test_internal_failures_become_a_code_and_a_plain_sentence(error, code):
    got_code, message = describe_failure(error)
    assert got_code == code
    for internal in ("10.0.3.7", "http", "tenants/", "/var/lib", type(error).__name__, "Error"):
        assert internal not in message, (internal, message)


def test_a_training_file_problem_is_told_as_is():
    error = TrainingFileError("training file file-1 does not match its recorded sha256")
    assert describe_failure(error) == ("invalid_training_file", str(error))


def test_a_crashed_evaluation_is_its_own_code_without_internals():
    from finetune.job import EvaluationCrashed

    code, message = describe_failure(EvaluationCrashed(f"evaluation failed: KeyError {INTERNAL}"))
    assert code == "evaluation_failed" and "nothing was registered" in message
    assert "10.0.3.7" not in message and "KeyError" not in message
