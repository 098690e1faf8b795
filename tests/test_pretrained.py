"""Pretrained DINOv2 weights by name: download from a local HTTP server, cache hit, checksum refusal, fail fast."""

from __future__ import annotations

import hashlib
import io
import re
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch

from monai_dnprd.networks import load_dinov2_weights
from monai_dnprd.networks import pretrained as pt
from monai_dnprd.networks.vit import ViTEncoder

NAME = "dinov2_vits14"
TINY = dict(patch_size=14, embed_dim=32, depth=2, num_heads=2, num_register_tokens=4, layerscale_init=1.0)


class _Server:
    """Files served on 127.0.0.1 and the paths requested, in order."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.hits: list[str] = []
        files, hits = self.files, self.hits

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server API
                hits.append(self.path)
                body = files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Cache under tmp_path, no proxies, and any URL other than 127.0.0.1 fails the test (never the internet)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    real = pt.urlopen

    def local_only(url: str, *args: object, **kwargs: object) -> object:
        assert urlsplit(url).hostname == "127.0.0.1", f"test tried to reach {url}"
        return real(url, *args, **kwargs)

    monkeypatch.setattr(pt, "urlopen", local_only)


@pytest.fixture
def server() -> Iterator[_Server]:
    """A local HTTP server for the duration of one test."""
    s = _Server()
    yield s
    s.close()


def tiny_checkpoint() -> tuple[dict[str, torch.Tensor], bytes]:
    """A random DINOv2-layout state dict (3x3 native grid, as DINOv2's 37x37 differs from ours) and its bytes."""
    torch.manual_seed(0)
    sd = ViTEncoder(img_size=42, **TINY).state_dict()
    buf = io.BytesIO()
    torch.save(sd, buf)
    return sd, buf.getvalue()


def serve_as(monkeypatch: pytest.MonkeyPatch, server: _Server, body: bytes, sha256: str | None = None) -> str:
    """Point NAME's table entry at the local server (tiny shape), serving `body`; returns the URL."""
    path = f"/dinov2/{NAME}/{NAME}_pretrain.pth"
    server.files[path] = body
    url = server.base + path
    spec = pt.Dinov2Checkpoint(
        url=url, sha256=sha256 or hashlib.sha256(body).hexdigest(), embed_dim=32, depth=2, num_heads=2,
        num_register_tokens=4,
    )
    monkeypatch.setitem(pt.DINOV2_CHECKPOINTS, NAME, spec)
    return url


def cache_dir(tmp_path: Path) -> Path:
    """The hub checkpoints folder under the test's TORCH_HOME."""
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def test_download_then_cache_hit(monkeypatch, server, tmp_path):
    sd, body = tiny_checkpoint()
    serve_as(monkeypatch, server, body)
    enc = ViTEncoder(img_size=28, **TINY)
    assert load_dinov2_weights(enc, NAME) == []
    assert torch.equal(enc.blocks[1].attn.qkv.weight, sd["blocks.1.attn.qkv.weight"])
    assert torch.equal(enc.register_tokens, sd["register_tokens"])
    cached = cache_dir(tmp_path) / f"{NAME}_pretrain.pth"
    assert pt.dinov2_cache_path(NAME) == cached and cached.read_bytes() == body
    assert [p.name for p in cache_dir(tmp_path).iterdir()] == [cached.name]  # no temp file left behind
    assert len(server.hits) == 1

    enc2 = ViTEncoder(img_size=28, **TINY)
    assert load_dinov2_weights(enc2, NAME) == []  # cache hit: the server sees no second request
    assert len(server.hits) == 1
    assert torch.equal(enc2.blocks[0].mlp.fc1.weight, sd["blocks.0.mlp.fc1.weight"])


def test_checksum_mismatch_refused_and_not_cached(monkeypatch, server, tmp_path):
    _, body = tiny_checkpoint()
    url = serve_as(monkeypatch, server, body, sha256="0" * 64)
    with pytest.raises(pt.PretrainedWeightsError) as err:
        load_dinov2_weights(ViTEncoder(img_size=28, **TINY), NAME)
    msg = str(err.value)
    assert "\n" not in msg and "checksum mismatch" in msg and url in msg
    assert str(cache_dir(tmp_path) / f"{NAME}_pretrain.pth") in msg
    assert not any(cache_dir(tmp_path).iterdir())  # neither the file nor a partial download
    assert err.value.__cause__ is None and err.value.__context__ is None  # the root cause is this message


def test_corrupt_cache_file_refused(monkeypatch, server, tmp_path):
    _, body = tiny_checkpoint()
    serve_as(monkeypatch, server, body)
    cached = pt.fetch_dinov2(NAME, progress=False)
    cached.write_bytes(body[:-10])  # truncated (or replaced) after the download
    with pytest.raises(pt.PretrainedWeightsError, match="does not match the published SHA-256") as err:
        load_dinov2_weights(ViTEncoder(img_size=28, **TINY), NAME)
    assert str(cached) in str(err.value) and "\n" not in str(err.value)
    assert len(server.hits) == 1


def test_unreachable_fails_fast_with_one_line(monkeypatch, tmp_path):
    with socket.socket() as s:  # a port on 127.0.0.1 that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/dinov2/{NAME}/{NAME}_pretrain.pth"
    spec = pt.Dinov2Checkpoint(url=url, sha256="0" * 64, embed_dim=32, depth=2, num_heads=2, num_register_tokens=4)
    monkeypatch.setitem(pt.DINOV2_CHECKPOINTS, NAME, spec)
    t0 = time.monotonic()
    with pytest.raises(pt.PretrainedWeightsError) as err:
        load_dinov2_weights(ViTEncoder(img_size=28, **TINY), NAME)
    assert time.monotonic() - t0 < 5
    msg = str(err.value)
    path = cache_dir(tmp_path) / f"{NAME}_pretrain.pth"
    assert "\n" not in msg and url in msg and f"place it at {path}" in msg
    assert err.value.__cause__ is None and err.value.__context__ is None
    assert not path.exists()


def test_hanging_connection_times_out(monkeypatch, tmp_path):
    release = threading.Event()

    def hang(url: str, timeout: float) -> object:
        release.wait(10)
        raise OSError("released")

    monkeypatch.setattr(pt, "urlopen", hang)  # e.g. a DNS lookup or SYN that never answers
    monkeypatch.setattr(pt, "DOWNLOAD_TIMEOUT", 0.3)
    t0 = time.monotonic()
    try:
        with pytest.raises(pt.PretrainedWeightsError, match=r"no connection within 0.3 s"):
            pt.fetch_dinov2("dinov2_vits14", progress=False)
    finally:
        release.set()
    assert time.monotonic() - t0 < 3
    assert not any(cache_dir(tmp_path).iterdir())


def test_encoder_mismatch_refused_before_download(monkeypatch):
    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("downloaded a checkpoint the encoder cannot hold")

    monkeypatch.setattr(pt, "fetch_dinov2", no_download)
    tiny = ViTEncoder(img_size=96, patch_size=6, embed_dim=192, depth=2, num_heads=3)
    with pytest.raises(pt.PretrainedWeightsError) as err:
        load_dinov2_weights(tiny, "dinov2_vits14")
    msg = str(err.value)
    assert "\n" not in msg and "needs vit=small" in msg and "patch_size=14" in msg
    assert "dinov2_vitb14_reg (vit=base, patch_size=14)" in msg
    for name in ("dinov2_vitl14", "dinov2_vitg14_reg"):
        with pytest.raises(pt.PretrainedWeightsError, match="names that work: dinov2_vits14 ") as err:
            load_dinov2_weights(tiny, name)
        assert "\n" not in str(err.value)
    small = ViTEncoder(img_size=28, patch_size=14, embed_dim=384, depth=1, num_heads=6)
    with pytest.raises(pt.PretrainedWeightsError, match="SwiGLU MLP"):  # same check even with a wide encoder
        load_dinov2_weights(small, "dinov2_vitg14")


def test_existing_path_wins_and_unknown_name(monkeypatch, tmp_path):
    sd, body = tiny_checkpoint()
    monkeypatch.chdir(tmp_path)
    Path(NAME).write_bytes(body)  # a local file named like a known name is loaded, no download
    monkeypatch.setattr(pt, "fetch_dinov2", lambda *a, **k: pytest.fail("a local file should win"))
    enc = ViTEncoder(img_size=28, **TINY)
    assert load_dinov2_weights(enc, NAME) == []
    assert torch.equal(enc.norm.weight, sd["norm.weight"])
    with pytest.raises(FileNotFoundError, match="not a known DINOv2 name.*dinov2_vits14_reg") as err:
        load_dinov2_weights(enc, "dinov2_vits14_reg4")
    assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="file not found"):
        load_dinov2_weights(enc, tmp_path / "missing.pth")


def test_url_table_follows_official_scheme():
    assert set(pt.DINOV2_CHECKPOINTS) == {f"dinov2_vit{a}14{r}" for a in "sblg" for r in ("", "_reg")}
    for name, spec in pt.DINOV2_CHECKPOINTS.items():
        arch = name.removesuffix("_reg")
        file = f"{arch}_reg4_pretrain.pth" if name.endswith("_reg") else f"{arch}_pretrain.pth"
        assert spec.url == f"https://dl.fbaipublicfiles.com/dinov2/{arch}/{file}" and spec.filename == file
        assert re.fullmatch(r"[0-9a-f]{64}", spec.sha256)
        assert spec.num_register_tokens == (4 if name.endswith("_reg") else 0)
    assert len({s.sha256 for s in pt.DINOV2_CHECKPOINTS.values()}) == 8
    assert [n.split()[0] for n in pt.loadable_names()] == [
        "dinov2_vits14", "dinov2_vits14_reg", "dinov2_vitb14", "dinov2_vitb14_reg"
    ]


@pytest.mark.slow
def test_paper_preset_trains_two_iterations_with_served_dinov2_weights(monkeypatch, server, tmp_path, tiny_data):
    """paper.json (ViT-S/14, 224 px, DINOv2 by name, no warm-up, bf16 on CUDA) runs on CPU, weights served locally."""
    import json as _json

    from conftest import run_workflow

    from monai_dnprd.config import workflow_configs

    name = "dinov2_vits14_reg"
    torch.manual_seed(0)
    sd = ViTEncoder(img_size=518, patch_size=14, embed_dim=384, depth=12, num_heads=6, num_register_tokens=4,
                    layerscale_init=1.0).state_dict()  # DINOv2's own 37x37 grid: pos_embed is resized on loading
    buf = io.BytesIO()
    torch.save(sd, buf)
    body = buf.getvalue()
    path = f"/dinov2/dinov2_vits14/{name}4_pretrain.pth"
    server.files[path] = body
    spec = pt.Dinov2Checkpoint(url=server.base + path, sha256=hashlib.sha256(body).hexdigest(), embed_dim=384,
                               depth=12, num_heads=6, num_register_tokens=4)
    monkeypatch.setitem(pt.DINOV2_CHECKPOINTS, name, spec)
    preset = _json.loads((Path(workflow_configs(Path(__file__).parents[1] / "bundle", "training")[0]).parent
                          / "paper.json").read_text())
    assert preset["pretrained"] == name and preset["img_size"] == 224 and preset["warmup_iterations"] == 0
    assert "precision" not in preset  # train.json's "auto" (bf16 where native) applies
    out = tmp_path / "paper"
    run_workflow("train.json", "training", extra_configs=["paper.json"], output_dir=str(out),
                 dataset_dir=str(tiny_data["train"]), val_dir=str(tiny_data["val"]), num_iterations=2, batch_size=2,
                 data__samples_per_volume=1, map__fit_slices=8, device="cpu")
    meta = _json.loads((out / "models" / "model.json").read_text())
    net = meta["config"]["network"]
    assert (net["vit"], net["patch_size"], net["depth"], net["img_size"]) == ("small", 14, 12, 224)
    assert meta["config"]["sigma"] == 3.5 and len(server.hits) == 1
    state = torch.load(out / "models" / "model.pt", weights_only=True)
    # two steps at the encoder's 1e-5 learning rate leave the served weights all but unchanged
    torch.testing.assert_close(state["network.encoder.blocks.5.attn.qkv.weight"], sd["blocks.5.attn.qkv.weight"],
                               atol=1e-3, rtol=0)
    log = [_json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert not any("mim" in r for r in log)  # no warm-up with pretrained weights
