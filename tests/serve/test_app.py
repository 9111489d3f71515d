"""ccj-serve through an in-process client, on a tiny random-weight model and a folder served_corpus that
ccj-embed's Python entry embeds: a Chinese query answers the ids and scores of ``ccj-embed query``;
an image upload those of ``ccj-embed query --image``; image -> texts those of a brute-force
search; a burst of concurrent queries compiles nothing and takes fewer device calls than
queries; every bad input is a 4xx with a one-line JSON error and the service keeps answering."""

import asyncio
import io
import json
import shutil
import socket
import subprocess
import sys
import threading
import time

import httpx2 as httpx
import numpy as np
import PIL.Image
import pytest
from _serve_corpus import N_IMAGES, build

from chinese_clip_jax import embed, serve
from chinese_clip_jax.embed import cli as embed_cli
from chinese_clip_jax.inference import ChineseCLIP

pytest.importorskip("fastapi")
pytest.importorskip("faiss")
from fastapi.testclient import TestClient  # noqa: E402

from chinese_clip_jax.serve.app import create_app  # noqa: E402

UPLOAD_LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def served_corpus(tmp_path_factory):
    return build(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def service(served_corpus):
    options = serve.ServeOptions(max_batch=4, max_wait_ms=50, max_upload_bytes=UPLOAD_LIMIT)
    s = serve.Service.load(served_corpus["out"], options=options)  # the manifest's model, every bucket compiled
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(service):
    with TestClient(create_app(service)) as c:
        yield c


def _embed_query(capsys, *args) -> list[dict]:
    capsys.readouterr()
    assert embed_cli.main(["query", *map(str, args)]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_start_up_says_what_it_loaded(service, served_corpus):
    lines = service.loaded()
    assert lines[0].startswith(f"model: {served_corpus['model']} (dim 8, context 52 tokens)")
    assert f"images: {N_IMAGES} rows from {served_corpus['out']} (IndexFlatIP index" in lines[1]
    assert "texts: 6 rows" in lines[2] and "(exact index" in lines[2]
    assert f"images: {N_IMAGES} source images" in lines


def test_chinese_query_gives_the_ids_and_scores_of_ccj_embed_query(client, served_corpus, capsys):
    for q in ("海边的日落", "一只猫在沙发上"):
        want = _embed_query(capsys, served_corpus["out"], "--text", q, "-k", 7)[0]["hits"]
        res = client.get("/search", params={"q": q, "k": 7})
        assert res.status_code == 200, res.text
        body = res.json()
        assert [h["id"] for h in body["hits"]] == [h["id"] for h in want]
        assert [round(h["score"], 6) for h in body["hits"]] == [h["score"] for h in want]
        assert body["model"] == str(served_corpus["model"]) and body["k"] == 7
        assert body["index"] == {
            "dir": str(served_corpus["out"]),
            "kind": "images",
            "type": "IndexFlatIP",
            "rows": N_IMAGES,
        }
        assert body["query"] == {"text": q, "tokens": len(q) + 2, "truncated": False}


def test_image_upload_gives_the_ids_and_scores_of_ccj_embed_query(client, served_corpus, capsys):
    path = served_corpus["images"] / "风景" / "001.png"
    want = _embed_query(capsys, served_corpus["out"], "--image", path, "-k", 5)[0]["hits"]
    res = client.post("/search/image", params={"k": 5}, content=path.read_bytes())
    assert res.status_code == 200, res.text
    hits = res.json()["hits"]
    assert hits[0]["id"] == "风景/001.png"  # an image finds itself first
    assert [h["id"] for h in hits] == [h["id"] for h in want]
    np.testing.assert_allclose([h["score"] for h in hits], [h["score"] for h in want], atol=2e-6)


def test_image_to_texts_is_the_exact_search_over_the_text_run(client, served_corpus):
    path = served_corpus["images"] / "animals" / "000.jpg"
    res = client.post("/search/image", params={"k": 6, "target": "texts"}, content=path.read_bytes())
    assert res.status_code == 200, res.text
    body = res.json()
    clip = ChineseCLIP.from_pretrained(str(served_corpus["model"]))
    want = embed.exact_search(served_corpus["out"], clip.encode_image([str(path)]), kind="texts", k=6)[0]
    assert [h["id"] for h in body["hits"]] == [i for i, _ in want]  # line numbers; line 5 was blank
    np.testing.assert_allclose([h["score"] for h in body["hits"]], [s for _, s in want], atol=2e-6)
    captions = served_corpus["captions"].read_text(encoding="utf-8").splitlines()
    assert [h["text"] for h in body["hits"]] == [captions[i] for i, _ in want]
    assert body["index"]["kind"] == "texts" and body["index"]["type"] == "exact"


def test_a_long_query_is_cut_to_the_context_length_and_says_so(client):
    long = "猫" * 10_000
    res = client.post("/search", json={"q": long, "k": 5})  # 10,000 CJK characters: too long for a URL
    assert res.status_code == 200, res.text
    q = res.json()["query"]
    assert q["truncated"] and q["tokens"] == 10_002
    assert q["note"] == "the query has 10002 tokens; only the first 52 were used"
    cut = client.get("/search", params={"q": "猫" * 50, "k": 5}).json()  # [CLS] + 50 + [SEP] = 52 tokens
    assert res.json()["hits"] == cut["hits"]
    ascii_long = client.get("/search", params={"q": "cat " * 2_500, "k": 5})  # 10,000 characters in a URL
    assert ascii_long.status_code == 200 and ascii_long.json()["query"]["truncated"]


def test_source_image_and_thumbnail_by_id_only(client, served_corpus):
    res = client.get("/image", params={"id": "风景/001.png"})
    assert res.status_code == 200 and res.headers["content-type"] == "image/png"
    assert res.content == (served_corpus["images"] / "风景" / "001.png").read_bytes()
    thumb = client.get("/thumbnail", params={"id": "animals/000.jpg"})
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert thumb.content[:2] == b"\xff\xd8"


def _one_line_error(res, status: int, *fragments: str) -> None:
    assert res.status_code == status, res.text
    body = res.json()
    assert list(body) == ["error"] and "\n" not in body["error"], body
    for f in fragments:
        assert f in body["error"], body["error"]


BAD = [
    ("get", "/search", {"q": ""}, None, 400, ["q is empty"]),
    ("get", "/search", {"q": " \t\n　"}, None, 400, ["q is empty"]),
    ("get", "/search", {"q": "\x00\ufffd"}, None, 400, ["q is empty once tokenized"]),
    ("post", "/search", {}, b'{"q": "\\ud800abc"}', 400, ["q cannot be tokenized", "lone surrogate"]),
    ("get", "/search", {"q": "猫", "k": 0}, None, 400, ["k must be >= 1, got 0"]),
    ("get", "/search", {"q": "猫", "k": -4}, None, 400, ["k must be >= 1, got -4"]),
    ("get", "/search", {"q": "猫", "k": N_IMAGES + 1}, None, 400, [f"k={N_IMAGES + 1} is above", f"size {N_IMAGES}"]),
    ("get", "/search", {"q": "猫", "k": "many"}, None, 422, ["k: ", "valid integer", "'many'"]),
    ("post", "/search/image", {"k": 3}, b"", 400, ["empty (0 bytes)"]),
    ("post", "/search/image", {"k": 3}, b"%PDF-1.4 not an image", 400, ["not an image"]),
    ("post", "/search/image", {"k": 3}, "TRUNCATED", 400, ["cannot be decoded"]),
    ("post", "/search/image", {"k": 3}, b"\0" * (UPLOAD_LIMIT + 1), 413, [f"limit of {UPLOAD_LIMIT} bytes"]),
    ("post", "/search/image", {"k": 3}, "HUGE", 413, ["is 8000x8000 pixels, above the limit of 50000000"]),
    ("post", "/search/image", {"k": 0}, "TRUNCATED", 400, ["k must be >= 1"]),
    ("post", "/search/image", {"target": "videos"}, b"x", 422, ["target"]),
    ("get", "/image", {"id": "nope.png"}, None, 404, ["unknown image id 'nope.png'"]),
    ("get", "/image", {"id": "../captions.txt"}, None, 404, ["unknown image id"]),
    ("get", "/thumbnail", {"id": "/etc/passwd"}, None, 404, ["unknown image id"]),
    ("get", "/image", {"id": "animals/broken.jpg"}, None, 404, ["unknown image id"]),  # skipped by ccj-embed
    ("get", "/image", {}, None, 422, ["id: "]),
    ("get", "/no/such/page", {}, None, 404, ["/no/such/page"]),
]


@pytest.mark.parametrize("method,url,params,body,status,fragments", BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_is_a_one_line_4xx_and_the_service_keeps_answering(
    client, served_corpus, method, url, params, body, status, fragments
):
    if body == "TRUNCATED":
        body = (served_corpus["images"] / "animals" / "000.jpg").read_bytes()[:300]
    elif body == "HUGE":  # a few KB of PNG that claims 64 megapixels
        buf = io.BytesIO()
        PIL.Image.new("1", (8000, 8000)).save(buf, "PNG")
        body = buf.getvalue()
        assert len(body) < UPLOAD_LIMIT
    headers = {"content-type": "application/json"} if url == "/search" and method == "post" else {}
    res = client.request(method.upper(), url, params=params, content=body, headers=headers)
    _one_line_error(res, status, *fragments)
    assert client.get("/healthz").status_code == 200
    assert client.get("/search", params={"q": "红色的汽车", "k": 2}).status_code == 200


def test_a_burst_compiles_nothing_and_is_micro_batched(service, client, served_corpus):
    app = client.app
    queries = [f"第{i}个查询" + "的" * i for i in range(11)]
    image = (served_corpus["images"] / "animals" / "006.jpg").read_bytes()
    alone = [client.get("/search", params={"q": q, "k": 3}).json()["hits"] for q in queries]
    compiles = service.queries.compiles()
    text_calls, image_calls = service.queries.texts.calls, service.queries.images.calls

    async def burst():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://serve") as c:
            texts = [c.get("/search", params={"q": q, "k": 3}) for q in queries]
            images = [c.post("/search/image", params={"k": 3}, content=image) for _ in range(5)]
            return await asyncio.gather(*texts, *images)

    answers = asyncio.run(burst())
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200]
    assert service.queries.compiles() == compiles  # every bucket was compiled at start-up
    text_batches = service.queries.texts.calls - text_calls
    image_batches = service.queries.images.calls - image_calls
    assert 3 <= text_batches < len(queries) and 2 <= image_batches < 5  # batches of at most max_batch=4
    for got, want in zip(answers, alone):  # batched with others, the same answer as alone
        assert [h["id"] for h in got.json()["hits"]] == [h["id"] for h in want]
        np.testing.assert_allclose([h["score"] for h in got.json()["hits"]], [h["score"] for h in want], atol=1e-6)


def test_files_changed_underneath_answer_503_until_restarted(service, served_corpus, tmp_path):
    out = tmp_path / "emb"
    shutil.copytree(served_corpus["out"], out)
    options = serve.ServeOptions(max_batch=4, warm_up=False)
    moved = serve.Service(serve.Catalog(out), service.queries.clip, service.model_name, options)
    try:
        with TestClient(create_app(moved)) as c:
            assert c.get("/search", params={"q": "猫", "k": 2}).status_code == 200
            manifest = json.loads((out / "images.json").read_text())
            (out / "images.json").write_text(json.dumps(dict(manifest, rows=1)))  # e.g. a rerun of ccj-embed
            for res in (c.get("/search", params={"q": "猫"}), c.get("/healthz"), c.get("/image", params={"id": "x"})):
                _one_line_error(res, 503, "the index files changed since start-up (images.json in", "restart")
            assert c.get("/").status_code == 200  # the page still loads, and says so
    finally:
        moved.close()


def test_openapi_describes_the_endpoints(client):
    spec = client.get("/openapi.json").json()
    assert {"/search", "/search/image", "/image", "/thumbnail", "/healthz"} <= set(spec["paths"])
    assert "image/*" in spec["paths"]["/search/image"]["post"]["requestBody"]["content"]
    page = client.get("/")
    assert page.status_code == 200 and "以图搜图" in page.text and 'name="viewport"' in page.text
    for asset in ("/", "/static/app.js", "/static/style.css"):  # nothing from outside this server (no CDN)
        text = client.get(asset).text
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, asset


def _serve_cli(*args):
    """``python -m chinese_clip_jax.serve ARGS`` to its end (the refusals come before the model loads)."""
    cmd = [sys.executable, "-m", "chinese_clip_jax.serve", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_not_a_ccj_embed_directory_is_a_one_line_error_before_the_model_loads(tmp_path):
    res = _serve_cli("--embeddings", str(tmp_path))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"error: --embeddings {tmp_path}: no images.json or texts.json (not a ccj-embed --out directory)"
    ]


def test_a_taken_port_is_a_one_line_error_before_the_model_loads(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = _serve_cli("--embeddings", str(tmp_path), "--port", str(port))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"error: --host 127.0.0.1 --port {port}: cannot bind (Address already in use)"
    ]


def test_micro_batcher_batches_refuses_when_full_and_survives_errors():
    calls = []
    gate = threading.Event()

    def fn(items):
        gate.wait(5)
        calls.append(list(items))
        if "boom" in items:
            raise RuntimeError("boom")
        return [i * 2 for i in items]

    b = serve.MicroBatcher(fn, max_batch=8, max_wait_ms=100, max_queue=4)
    futures = [b.submit(i) for i in range(4)]
    with pytest.raises(serve.Busy, match="queue is full"):
        for i in range(20):  # the worker holds at most one batch; the queue takes 4 more
            futures.append(b.submit(i))
    gate.set()
    assert [f.result(5) for f in futures[:4]] == [0, 2, 4, 6]
    bad = b.submit("boom")
    with pytest.raises(RuntimeError, match="boom"):
        bad.result(5)
    assert b.submit(21).result(5) == 42  # the worker goes on
    assert len(calls) < len(futures) + 2
    b.close()
    time.sleep(0)


def test_a_text_run_of_another_model_is_not_served(service, served_corpus, tmp_path):
    out = tmp_path / "emb"
    shutil.copytree(served_corpus["out"], out)
    manifest = json.loads((out / "texts.json").read_text())
    (out / "texts.json").write_text(json.dumps(dict(manifest, model="another/model")))
    options = serve.ServeOptions(max_batch=4, warm_up=False)
    other = serve.Service(serve.Catalog(out), service.queries.clip, "moved/model", options)
    try:
        assert set(other.catalog.runs) == {"images"}
        lines = other.loaded()
        assert (
            f"not serving the texts run: embedded with another/model, the images run with {served_corpus['model']}"
            in lines
        )
        assert f"queries are encoded with moved/model; the runs were embedded with {served_corpus['model']}" in lines
        with TestClient(create_app(other)) as c:
            res = c.post("/search/image", params={"target": "texts"}, content=b"x")
            _one_line_error(res, 404, "no text corpus embedded with moved/model")
            (out / "texts.json").write_text("{}")  # a file no longer served is no longer watched
            assert c.get("/search", params={"q": "猫", "k": 2}).status_code == 200
    finally:
        other.close()
