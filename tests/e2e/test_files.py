"""Dataset uploads through the farm: OpenAI Files shape, verified storage, isolation, rejections."""

from __future__ import annotations

import io
import zipfile

import openai
import pytest

from finetune.world import write_brand_zip

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> bytes:
    path = write_brand_zip(tmp_path_factory.mktemp("ds") / "acme.zip", "acme", n=8, seed=1)
    return path.read_bytes()


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_upload_list_get_delete_with_openai_client(farm, dataset):
    key = farm.new_tenant("files-co")
    client = openai.OpenAI(base_url=farm.api, api_key=key, max_retries=0)
    f = client.files.create(file=("acme.zip", dataset), purpose="fine-tune")
    assert f.bytes == len(dataset) and f.filename == "acme.zip" and f.purpose == "fine-tune"
    assert f.model_extra["images"] == 8
    obj = f"tenants/files-co/files/{f.id}.zip"
    assert farm.store.get_bytes(obj) == dataset  # stored whole, under the tenant's prefix
    assert [x.id for x in client.files.list().data] == [f.id]
    assert client.files.retrieve(f.id).model_extra["sha256"] == f.model_extra["sha256"]
    assert client.files.delete(f.id).deleted is True
    assert not farm.store.exists(obj)
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)


def test_another_tenants_file_is_404(farm, dataset):
    a = farm.http(farm.new_tenant("files-a"))
    b = farm.http(farm.new_tenant("files-b"))
    up = a.post("/files", files={"file": ("a.zip", dataset)}, data={"purpose": "fine-tune"})
    assert up.status_code == 200, up.text
    file_id = up.json()["id"]
    assert b.get(f"/files/{file_id}").status_code == 404
    assert b.delete(f"/files/{file_id}").status_code == 404
    assert b.get("/files").json()["data"] == []
    # Another tenant's file and a file that never existed get the same answer.
    theirs = b.get(f"/files/{file_id}").json()["error"]
    missing = b.get("/files/file-doesnotexist").json()["error"]
    assert theirs["code"] == missing["code"] == "file_not_found"
    assert theirs["message"] == missing["message"].replace("file-doesnotexist", file_id)
    assert a.get(f"/files/{file_id}").status_code == 200


@pytest.mark.parametrize(
    ("case", "body", "words"),
    [
        ("not a zip", b"hello, not a zip", ["zip"]),
        ("empty", b"", ["empty"]),
        ("escaping entry", None, ["../evil.png"]),
        ("undecodable image", None, ["0001.png"]),
    ],
)
def test_bad_dataset_is_400_and_nothing_is_kept(farm, dataset, case, body, words):
    if case == "escaping entry":
        body = _zip({"../evil.png": b"x", "evil.txt": b"caption"})
    elif case == "undecodable image":
        body = _zip({"0001.png": b"not a png at all", "0001.txt": b"a caption"})
    key = farm.new_tenant(f"bad-{case.replace(' ', '-')}")
    objects, files = farm.all_objects(), farm.files.count()
    with farm.http(key) as c:
        resp = c.post("/files", files={"file": ("d.zip", body)}, data={"purpose": "fine-tune"})
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == "file" and err["code"] == "invalid_dataset"
    for w in words:
        assert w in err["message"]
    assert farm.all_objects() == objects and farm.files.count() == files


def test_wrong_purpose_and_oversize(farm, dataset):
    key = farm.new_tenant("files-limits")
    with farm.http(key) as c:
        resp = c.post("/files", files={"file": ("d.zip", dataset)}, data={"purpose": "batch"})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "purpose"
        limit = farm.settings.dataset_max_upload_bytes + 1024 * 1024
        big = c.post(
            "/files",
            files={"file": ("big.zip", b"\0" * (limit + 1))},
            data={"purpose": "fine-tune"},
        )
    assert big.status_code == 413 and str(limit) in big.json()["error"]["message"]
    # Within the body limit but over the dataset limit: refused by the validator, also 413.
    with farm.http(key) as c:
        over = c.post(
            "/files",
            files={"file": ("over.zip", b"\0" * (farm.settings.dataset_max_upload_bytes + 1))},
            data={"purpose": "fine-tune"},
        )
    assert over.status_code == 413, over.text
