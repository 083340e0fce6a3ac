"""Issue 15, class 9 (data half): bad data are named as data, in a few words: NaN / inf (count, first index, no
tensor dump), a dtype that does not match the model, empty data, an unusable device, unreadable or malicious data
files (refused, nothing run)."""

from __future__ import annotations

import math
import os
import pickle
import warnings
import zipfile

import numpy as np
import pytest
import torch
from torch.distributions import Independent, Normal

import latentdiag as ld
from latentdiag._runtime import DeviceError, resolve_device
from latentdiag.data.spec import load_spec
from latentdiag.errors import ExitCode, InvalidDataError, LatentdiagError
from latentdiag.report import run_report
from latentdiag.testing import LinearGaussianModel

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> LinearGaussianModel:
    return LinearGaussianModel.random(6, 2, seed=0, posterior="mean_field")


@pytest.fixture(scope="module")
def x(model) -> torch.Tensor:
    return model.sample(1000, torch.Generator().manual_seed(0))


class Plain(torch.nn.Module):
    """A float32 model that does not cast its input (as most user models)."""

    def __init__(self):
        super().__init__()
        self.enc, self.dec = torch.nn.Linear(6, 4), torch.nn.Linear(2, 6)

    def encode(self, x):
        h = self.enc(x)
        return Independent(Normal(h[:, :2], h[:, 2:].exp()), 1)

    def prior(self):
        return Independent(Normal(torch.zeros(2), torch.ones(2)), 1)

    def log_likelihood(self, x, z):
        return Normal(self.dec(z), 1.0).log_prob(x).sum(-1)


def test_nan_data_named_as_data_with_count_and_first_index(model, x):
    bad = x.clone()
    bad[17, 2] = float("nan")
    bad[400] = float("nan")
    bad[999, 0] = float("nan")
    for run in (lambda: ld.rate(model, bad), lambda: ld.encode(model, bad),
                lambda: run_report(model, bad, metrics=["rate", "aggregate"])):
        with pytest.raises(InvalidDataError) as err:
            run()
        text = str(err.value)
        assert text.startswith("data: 3 of 1000 datapoints contain NaN (first at index 17)")
        assert "tensor(" not in text and len(text) < 300 and "not the model" in text
    assert InvalidDataError.exit_code == ExitCode.USAGE


def test_inf_in_a_stream_of_batches(model, x):
    bad = x.clone()
    bad[700, 1] = float("inf")
    with pytest.raises(InvalidDataError, match=r"contain inf \(first at index 700\)"):
        ld.rate(model, [bad[:500], bad[500:]])
    # a numpy array is data too
    with pytest.raises(InvalidDataError, match="first at index 700"):
        ld.rate(model, bad.numpy())


@pytest.mark.parametrize("empty", [torch.empty(0, 6, dtype=torch.float64), [], [torch.empty(0, 6)]])
def test_empty_data_is_not_blamed_on_the_model(model, empty):
    with pytest.raises(InvalidDataError, match="data is empty: expected at least one datapoint"):
        ld.rate(model, empty)
    with pytest.raises(InvalidDataError, match="is empty"):
        run_report(model, empty, metrics=["rate"])


def test_dtype_mismatch_is_named_as_such(x):
    torch.manual_seed(0)
    net = Plain()
    with pytest.raises(InvalidDataError) as err:
        ld.rate(net, x)  # float64 data, float32 model
    text = str(err.value)
    assert text.startswith("data: dtype float64 does not match the model's parameters (float32)")
    assert "x.to(torch.float32)" in text and len(text) < 500
    with pytest.raises(InvalidDataError, match="dtype int64 does not match the model's parameters"):
        ld.rate(net, x.long())
    assert np.isfinite(ld.rate(net, x.float()).value)  # the right dtype runs


def test_a_model_error_with_matching_dtype_is_not_renamed(x):
    class Fails(Plain):
        def log_likelihood(self, x, z):
            raise RuntimeError("expected scalar type Float in my own code")

    with pytest.raises(RuntimeError, match="in my own code") as err:
        ld.distortion(Fails(), x.float())
    assert not isinstance(err.value, LatentdiagError)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_on_a_cpu_machine(model, x, device):
    with pytest.raises(DeviceError, match=f"device is '{device}' but CUDA is not available"):
        ld.rate(model, x, device=device)
    with pytest.raises(DeviceError):
        run_report(model, x, metrics=["rate"], device=device)
    assert issubclass(DeviceError, ValueError) and DeviceError.exit_code == ExitCode.RUNTIME


def test_unsupported_device_kinds():
    with pytest.raises(DeviceError, match="'meta' is not supported"):
        resolve_device("meta")
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got 'gpu'"):
        resolve_device("gpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_model_on_another_device_than_requested():
    from latentdiag._runtime import check_model_on

    with pytest.raises(DeviceError, match="device is 'cuda:0' but the model is on 'cpu'; move the model first"):
        check_model_on(Plain(), torch.device("cuda:0"))
    check_model_on(Plain(), torch.device("cpu"))


# -- data files ---------------------------------------------------------------------------------------------------
class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('LD_PWNED', '/tmp/ld-pwned')}",))


@pytest.fixture()
def files(tmp_path, monkeypatch):
    monkeypatch.setenv("LD_PWNED", str(tmp_path / "PWNED"))
    x = torch.randn(20, 6)
    torch.save(x, tmp_path / "ok.pt")
    raw = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "text.pt").write_text("hello\n")
    torch.save({"weights": x}, tmp_path / "nox.pt")
    torch.save(torch.zeros(0, 6), tmp_path / "zero.pt")
    torch.save({"x": x, "y": torch.randn(20)}, tmp_path / "floaty.pt")
    with open(tmp_path / "evil.pt", "wb") as fh:
        pickle.dump(_Evil(), fh)
    torch.save({"x": x}, tmp_path / "base.pt")
    with zipfile.ZipFile(tmp_path / "base.pt") as zin, zipfile.ZipFile(tmp_path / "evil_zip.pt", "w") as zout:
        for name in zin.namelist():
            zout.writestr(name, pickle.dumps(_Evil(), protocol=2) if name.endswith("data.pkl") else zin.read(name))
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object))
    np.savez(tmp_path / "now.npz", w=x.numpy())
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04garbage")
    np.save(tmp_path / "single.npy", x.numpy())
    os.replace(tmp_path / "single.npy", tmp_path / "single.npz")
    return tmp_path


@pytest.mark.parametrize("name,words", [
    ("trunc.pt", "could not be read as a torch tensor file"),
    ("text.pt", "could not be read as a torch tensor file"),
    ("nox.pt", "must hold a tensor 'x'"),
    ("zero.pt", "holds no datapoints"),
    ("floaty.pt", "'y' must hold integer class labels"),
    ("evil.pt", "was refused: it is not a plain tensor file"),
    ("evil_zip.pt", "unsupported GLOBAL posix.system"),
    ("obj.npz", "Object arrays cannot be loaded"),
    ("now.npz", "must hold an array 'x'; found arrays 'w'"),
    ("bad.npz", "could not be read as an .npz archive"),
    ("single.npz", "is a single .npy array"),
])
def test_unreadable_data_files_are_invalid_data_naming_the_file(files, name, words):
    kind = "tensor" if name.endswith(".pt") else "npz"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note on the pickle protocol
        with pytest.raises(InvalidDataError) as err:
            load_spec(f"{kind}:{files / name}")
    text = str(err.value)
    assert name in text and words in text and len(text) < 700
    assert not (files / "PWNED").exists()  # nothing in a malicious file ran


def test_good_files_still_load(files):
    assert load_spec(f"tensor:{files / 'ok.pt'}").shape == (20, 6)


def test_nan_made_by_the_model_is_short_and_blames_the_model():
    """Finite data, an encoder that makes NaN: torch's validate_args error used to arrive with a tensor dump of
    several kilobytes; now one sentence that names the parameter and points at check_model."""
    from latentdiag.errors import ProtocolViolationError

    class NanEncoder(Plain):
        def encode(self, x):
            h = self.enc(x) * float("nan")
            return Independent(Normal(h[:, :2], h[:, 2:].exp()), 1)

    with pytest.raises(ProtocolViolationError) as err:
        ld.rate(NanEncoder(), torch.randn(300, 6))
    text = str(err.value)
    assert "Expected parameter loc (Tensor of shape (256, 2))" in text and "tensor(" not in text
    assert len(text) < 600 and "check_model" in text and isinstance(err.value.__cause__, ValueError)


def test_integer_pixels_into_a_bernoulli_model_are_named_not_a_silent_rate():
    """uint8 levels 0..255 into a bernoulli MLP VAE gave a rate of ~1e8 nats without a word (rate only encodes)."""
    import latentdiag
    from latentdiag.errors import InvalidDataError
    from latentdiag.models import build_model

    model = build_model({"name": "mlp_vae", "kwargs": {"input_shape": [1, 8, 8], "latent_dim": 4}})
    levels = torch.randint(0, 256, (10, 1, 8, 8), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    with pytest.raises(InvalidDataError, match=r"x in \[0, 1\].*\[0, 25[0-9]\].*uint8"):
        latentdiag.rate(model, levels)
    assert math.isfinite(latentdiag.rate(model, (levels > 128).float()).value)
