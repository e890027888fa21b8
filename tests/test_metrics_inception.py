"""FID Inception extractor: TF1 resize, features vs torch-fidelity / pytorch-fid, weights handling.

The real weights are not downloaded in tests: random weights with the real file's layout are
loaded into both our network and the oracle's, and must give the same features.
"""

import copy
import dataclasses
import functools
import http.server
import os
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddpmkit.errors import UserError
from ddpmkit.metrics.inception import (
    FIDInceptionV3,
    extract_features,
    load_fid_inception,
    prepare_model,
    preprocess,
    randomize_weights_,
    resize_bilinear_tf1,
    tf32_disabled,
    tf32_enabled,
)
from ddpmkit.metrics.weights import (
    INCEPTION_WEIGHTS,
    default_weights_dir,
    resolve_inception_weights,
    sha256_of_file,
)


@pytest.fixture(scope="module")
def random_model():
    model = randomize_weights_(FIDInceptionV3(), torch.Generator().manual_seed(0))
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def weights_file(random_model, tmp_path_factory):
    """(path, spec) of a random weights file; spec carries its real hash and size."""
    path = str(tmp_path_factory.mktemp("weights") / "random_inception.pth")
    torch.save(random_model.state_dict(), path)
    spec = dataclasses.replace(INCEPTION_WEIGHTS, sha256=sha256_of_file(path),
                               num_bytes=os.path.getsize(path))
    return path, spec


def _images(batch, height, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, height, width), generator=g, dtype=torch.uint8)


# ----------------------------------------------------------------------------- resize

@pytest.mark.parametrize("size", [(28, 28), (32, 32), (64, 64), (17, 45), (300, 310)])
def test_resize_bit_exact_vs_torch_fidelity(size):
    compat = pytest.importorskip("torch_fidelity.interpolate_compat_tensorflow")
    x = _images(2, *size).float()
    ours = resize_bilinear_tf1(x, (299, 299))
    theirs = compat.interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299),
                                                              align_corners=False)
    assert torch.equal(ours, theirs)


def test_resize_has_no_half_pixel_offset():
    # TF1 samples output pixel j at input position j * in / out: the first output pixel is the
    # first input pixel and the sampled positions are multiples of in / out.
    x = torch.arange(4.0).view(1, 1, 1, 4).expand(1, 1, 2, 4).contiguous()
    out = resize_bilinear_tf1(x, (2, 8))
    assert torch.equal(out[0, 0, 0], torch.tensor([0, 0.5, 1, 1.5, 2, 2.5, 3, 3.0]))
    # torch's half-pixel-centre interpolation differs: the reason for the hand-written resize
    torch_out = F.interpolate(x, size=(2, 8), mode="bilinear", align_corners=False)
    assert not torch.allclose(torch_out, out)


def test_resize_to_same_size_is_identity():
    x = _images(1, 13, 7).float()
    assert torch.equal(resize_bilinear_tf1(x, (13, 7)), x)


def test_preprocess_range_and_grey():
    grey = _images(2, 9, 9)[:, :1]
    out = preprocess(grey)
    assert out.shape == (2, 3, 299, 299)
    assert torch.equal(out, preprocess(grey.expand(-1, 3, -1, -1)))
    assert out.min() >= -1 and out.max() < 1
    with pytest.raises(ValueError):
        preprocess(grey.float())


# ----------------------------------------------------------------------------- features

def test_features_match_torch_fidelity(random_model, weights_file):
    fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    oracle = fe.FeatureExtractorInceptionV3("inception-v3-compat",
                                            ["2048", "logits_unbiased", "logits"],
                                            feature_extractor_weights_path=weights_file[0])
    images = _images(2, 32, 32)
    with torch.no_grad():
        ours = random_model(images)
        pool, logits_unbiased, logits = oracle(images)
    assert ours.pool.shape == (2, 2048) and ours.logits_unbiased.shape == (2, 1008)
    assert ours.pool.std() > 0.1  # random weights still give non-trivial features
    assert torch.equal(ours.pool, pool)
    assert torch.equal(ours.logits_unbiased, logits_unbiased)
    assert torch.allclose(ours.logits_unbiased + random_model.fc.bias, logits, atol=1e-6)


def test_features_match_pytorch_fid(random_model, monkeypatch):
    pfi = pytest.importorskip("pytorch_fid.inception")
    state = random_model.state_dict()
    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: state)
    oracle = pfi.InceptionV3([3], resize_input=False, normalize_input=False).eval()
    x = preprocess(_images(2, 24, 24, seed=1))  # pytorch-fid's own resize is not TF's
    with torch.no_grad():
        ours = random_model.features(x)
        theirs = oracle(x)[0].flatten(1)
        # the patched mixed blocks (FIDInceptionA/C/E_1/E_2) one by one, on the same input
        for name, block in (("Mixed_5b", pfi.FIDInceptionA(192, 32)),
                            ("Mixed_6b", pfi.FIDInceptionC(768, 128)),
                            ("Mixed_7b", pfi.FIDInceptionE_1(1280)),
                            ("Mixed_7c", pfi.FIDInceptionE_2(2048))):
            ours_block = getattr(random_model, name)
            block.load_state_dict(ours_block.state_dict())
            block.eval()
            in_ch = ours_block.branch1x1.conv.in_channels
            h = torch.randn(1, in_ch, 9, 9, generator=torch.Generator().manual_seed(2))
            assert torch.equal(ours_block(h), block(h)), name
    assert torch.equal(ours, theirs)


def test_extract_features_batches_and_grey(random_model):
    images = _images(3, 8, 8)
    images[2] = images[2, :1]  # a grey image stored as RGB
    whole = extract_features(random_model, [images])
    split = extract_features(random_model, [images[:2], images[2:, :1]])  # 2 RGB, then 1 grey
    assert whole.num_images == 3 and whole.pool.dtype == np.float32
    assert whole.logits_unbiased.shape == (3, 1008)
    np.testing.assert_allclose(split.pool, whole.pool, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        extract_features(random_model, [])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_features_match_cpu(random_model):
    images = _images(2, 32, 32)
    cpu = extract_features(random_model, [images])
    for memory_format in (torch.contiguous_format, torch.channels_last):  # TF32 stays off
        model = prepare_model(copy.deepcopy(random_model), "cuda", memory_format)
        assert model.memory_format == memory_format
        gpu = extract_features(model, [images])
        np.testing.assert_allclose(gpu.pool, cpu.pool, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(gpu.logits_unbiased, cpu.logits_unbiased, rtol=1e-4,
                                   atol=1e-4)


def test_tf32_disabled_restores_settings():
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("older torch: legacy allow_tf32 flags")
    before = (matmul.fp32_precision, conv.fp32_precision)
    with tf32_disabled():
        assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
    assert (matmul.fp32_precision, conv.fp32_precision) == before


def test_tf32_enabled_restores_settings():
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("older torch: legacy allow_tf32 flags")
    before = (matmul.fp32_precision, conv.fp32_precision, torch.backends.cudnn.benchmark)
    with tf32_enabled():
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
        assert torch.backends.cudnn.benchmark
    assert (matmul.fp32_precision, conv.fp32_precision,
            torch.backends.cudnn.benchmark) == before
    with pytest.raises(RuntimeError), tf32_enabled():  # restored on errors too
        raise RuntimeError
    assert (matmul.fp32_precision, conv.fp32_precision,
            torch.backends.cudnn.benchmark) == before


def test_tf32_is_cuda_only_and_changes_the_identity(random_model):
    model = copy.deepcopy(random_model)
    strict = model.identity
    with pytest.raises(UserError, match="CUDA"):
        model.set_tf32(True)
    assert model.identity == strict and not model.tf32
    model.tf32 = True  # as set_tf32 does on a GPU
    assert model.identity == strict + "+tf32"
    model.identity = "other"  # the weights part can still be replaced
    assert model.identity == "other+tf32"
    # the CPU has no TF32: the same features through the TF32 branch
    images = _images(2, 16, 16)
    np.testing.assert_array_equal(extract_features(model, [images]).pool,
                                  extract_features(random_model, [images]).pool)


@pytest.mark.slow
def test_compiled_frozen_features_match_eager(random_model):
    images = _images(3, 24, 24)
    eager = extract_features(random_model, [images])
    model = copy.deepcopy(random_model).compile_frozen()
    assert model.compiled and model.identity == random_model.identity
    fast = extract_features(model, [images[:2], images[2:]])  # a second shape recompiles
    for a, b in ((fast.pool, eager.pool), (fast.logits_unbiased, eager.logits_unbiased)):
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-5  # float32 rounding: ~3e-7


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tf32_features_are_close_to_strict(random_model):
    images = _images(8, 32, 32)
    model = prepare_model(copy.deepcopy(random_model), "cuda")
    strict = extract_features(model, [images]).pool
    fast = extract_features(model.set_tf32(True), [images]).pool
    assert model.identity.endswith("+tf32")
    rel = np.linalg.norm(fast - strict) / np.linalg.norm(strict)
    assert rel < 1e-2, rel  # TF32: 10 mantissa bits, errors well under a percent


# ----------------------------------------------------------------------------- weights

def test_load_verified_weights(random_model, weights_file):
    path, spec = weights_file
    model = load_fid_inception(path, "cpu", spec=spec)
    assert model.identity.endswith(spec.sha256)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    images = _images(1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(images).pool, random_model(images).pool)


def test_wrong_hash_is_refused(weights_file):
    path, spec = weights_file
    wrong = dataclasses.replace(spec, sha256="0" * 64)
    with pytest.raises(UserError, match="sha256"):
        load_fid_inception(path, "cpu", spec=wrong)
    # the shipped constant: the random file is not the real one
    with pytest.raises(UserError, match="bytes"):
        resolve_inception_weights(path)


def test_missing_explicit_path_is_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_inception_weights(str(tmp_path / "nope.pth"))


def test_missing_weights_offline_says_where_to_put_them(tmp_path):
    # port 9 (discard) on localhost: the connection is refused at once, like being offline
    spec = dataclasses.replace(INCEPTION_WEIGHTS, url="http://127.0.0.1:9/weights.pth")
    with pytest.raises(UserError) as info:
        resolve_inception_weights(spec=spec, cache_dir=str(tmp_path))
    message = str(info.value)
    assert str(tmp_path / INCEPTION_WEIGHTS.filename) in message
    assert "--inception-weights" in message and "download" in message
    assert os.listdir(tmp_path) == []  # no partial file left behind
    with pytest.raises(UserError, match="not found"):
        resolve_inception_weights(spec=spec, cache_dir=str(tmp_path), download=False)


@pytest.fixture
def http_server(weights_file):
    """Serves the folder holding the random weights file on localhost."""
    folder = os.path.dirname(weights_file[0])
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=folder)
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_when_missing(weights_file, http_server, tmp_path):
    path, spec = weights_file
    spec = dataclasses.replace(spec, url=f"{http_server}/{os.path.basename(path)}")
    cache = tmp_path / "cache"
    got, sha = resolve_inception_weights(spec=spec, cache_dir=str(cache))
    assert got == str(cache / spec.filename) and sha == spec.sha256
    assert sha256_of_file(got) == spec.sha256
    # a download whose hash is wrong is not kept
    bad = dataclasses.replace(spec, sha256="f" * 64)
    with pytest.raises(UserError, match="sha256"):
        resolve_inception_weights(spec=bad, cache_dir=str(tmp_path / "other" / "checkpoints"))
    assert not (tmp_path / "other").exists()  # nor the empty folders made for it
    (tmp_path / "kept").mkdir()  # a folder that was there before stays
    with pytest.raises(UserError, match="sha256"):
        resolve_inception_weights(spec=bad, cache_dir=str(tmp_path / "kept"))
    assert os.listdir(tmp_path / "kept") == []


def test_cache_lookup_names_and_default_dir(weights_file, tmp_path, monkeypatch):
    path, spec = weights_file
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    checkpoints = tmp_path / "hub" / "checkpoints"
    assert default_weights_dir() == str(checkpoints)
    checkpoints.mkdir(parents=True)
    alt = checkpoints / spec.alt_filenames[0]  # torch-fidelity's name for the same file
    os.symlink(path, alt)
    offline = dataclasses.replace(spec, url="http://127.0.0.1:9/x")
    assert resolve_inception_weights(spec=offline)[0] == str(alt)
    primary = checkpoints / spec.filename
    primary.write_bytes(b"truncated")
    with pytest.raises(UserError, match="bytes"):  # a bad primary file is refused, not skipped
        resolve_inception_weights(spec=offline)


def test_weights_that_do_not_fit_are_user_error(tmp_path):
    path = str(tmp_path / "other.pth")
    torch.save({"conv.weight": torch.zeros(1)}, path)
    spec = dataclasses.replace(INCEPTION_WEIGHTS, sha256=sha256_of_file(path),
                               num_bytes=os.path.getsize(path))
    with pytest.raises(UserError, match="do not fit"):
        load_fid_inception(path, spec=spec)
