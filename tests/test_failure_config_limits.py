"""Issue 15, class 8: a recorded configuration is validated against stated limits before anything is built.

A 1.6 KB checkpoint whose configuration asks for enormous layers used to make ``report`` allocate 14 GB before any
check. Now the configuration is built on the meta device first (shapes, no memory), its parameters are counted
against MAX_PARAMETERS (env LATENTDIAG_MAX_PARAMETERS, or max_parameters=...), its building work is bounded, its
values are type-checked by the builders, and its shapes must match the recorded weights.
"""

import time

import pytest
import torch

from latentdiag import CheckpointReadError
from latentdiag.errors import ResourceLimitError
from latentdiag.models import build_model, load_reference_checkpoint, save_checkpoint
from latentdiag.report.source import load_model

SMALL = {"name": "mlp_vae", "kwargs": {"input_shape": [1, 4, 4], "latent_dim": 2, "hidden": [8]}}


def _crafted(tmp_path, config, name="crafted.pt"):
    """A tiny, internally consistent checkpoint (content hash included) whose configuration says ``config`` but
    whose weights are those of a small model: what an attacker or a damaged pipeline can write."""
    from latentdiag.models.checkpoint import content_hash

    payload = {"format": "latentdiag.checkpoint", "version": 1, "latentdiag_version": "0.1.0", "model": config,
               "state_dict": {"w": torch.zeros(2)}, "data": None, "training": None}
    payload["content_sha256"] = content_hash(payload)
    torch.save(payload, tmp_path / name)
    return tmp_path / name


def _peak_rss_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")                   # resets VmHWM (peak resident set) on Linux
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


@pytest.fixture
def no_real_build(monkeypatch):
    import latentdiag.models.registry as registry

    def refuse(name, kwargs):
        raise AssertionError(f"the real model {name!r} must not be built")

    monkeypatch.setattr(registry, "_build", refuse)
    import latentdiag.models.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "_build", refuse)


ENORMOUS = [
    ({"name": "mlp_vae", "kwargs": {"input_shape": [1, 28, 28], "hidden": [3_000_000, 3_000_000]}}, "hidden",
     "3000000"),
    ({"name": "lpvae_mnist", "kwargs": {"hidden": 1_000_000}}, "hidden", "1000000"),
    ({"name": "lpvae_mnist", "kwargs": {"channels": 4_000_000}}, "channels", "4000000"),
    ({"name": "lpvae_cifar", "kwargs": {"width": 200_000}}, "width", "200000"),
    ({"name": "lpvae_mnist", "kwargs": {"input_shape": [1, 10**30, 10]}}, "input_shape", "1000000000000"),
    ({"name": "lpvae_mnist", "kwargs": {"horizon": 10**5}}, "horizon", "100000"),
    ({"name": "lpvae_mnist", "kwargs": {"prior": "vlae_flow", "flow_hidden": 10**8}}, "flow_hidden", "100000000"),
    ({"name": "transformer_vae", "kwargs": {"vocab": 10**10}}, "vocab", "10000000000"),
    ({"name": "transformer_vae", "kwargs": {"vocab": 100, "ff_dim": 10**9}}, "ff_dim", "1000000000"),
]


@pytest.mark.parametrize("config, key, value", ENORMOUS, ids=[c[1] + "-" + c[0]["name"] for c in ENORMOUS])
def test_an_enormous_recorded_configuration_is_refused_fast_without_allocating(tmp_path, no_real_build, config,
                                                                               key, value):
    path = _crafted(tmp_path, config)
    assert path.stat().st_size < 4096                            # a tiny file
    reset = _peak_rss_reset()
    before = _peak_rss_mb()
    start = time.perf_counter()
    with pytest.raises(ResourceLimitError) as err:
        load_reference_checkpoint(path)
    elapsed = time.perf_counter() - start
    msg = str(err.value)
    assert f"config['kwargs'][{key!r}] = " in msg and value in msg, msg    # names the key and its value
    assert "limit of 2,000,000,000" in msg and "LATENTDIAG_MAX_PARAMETERS" in msg
    assert elapsed < 5.0
    if reset:
        assert _peak_rss_mb() - before < 300                   # nothing big was allocated
    assert err.value.exit_code == 3 and isinstance(err.value, ValueError)
    # the report's loader refuses it the same way
    with pytest.raises(ResourceLimitError, match=rf"config\['kwargs'\]\[{key!r}\]"):
        load_model(path)


@pytest.mark.parametrize("config, key", [
    ({"name": "lpvae_mnist", "kwargs": {"res_blocks": 10**8}}, "res_blocks"),
    ({"name": "lpvae_mnist", "kwargs": {"horizon": 10**9, "local_layer": "stacked"}}, "horizon"),
    ({"name": "lpvae_mnist", "kwargs": {"encoder_layers": 10**7}}, "encoder_layers"),
    ({"name": "transformer_vae", "kwargs": {"vocab": 50, "decoder_layers": 10**6, "d_model": 8, "heads": 2,
                                            "ff_dim": 8}}, "decoder_layers"),
], ids=["res_blocks", "stacked-horizon", "encoder_layers", "decoder_layers"])
def test_a_layer_count_bomb_is_refused_by_the_work_bound(tmp_path, no_real_build, config, key):
    path = _crafted(tmp_path, config)
    start = time.perf_counter()
    with pytest.raises(ResourceLimitError) as err:
        load_reference_checkpoint(path)
    assert time.perf_counter() - start < 10.0
    assert f"config['kwargs'][{key!r}]" in str(err.value) and "torch calls" in str(err.value)
    assert torch.is_grad_enabled() and torch.get_default_device() == torch.device("cpu")   # state restored
    assert torch.ones(1).device.type == "cpu"


def test_the_limit_is_exact_and_can_be_changed(tmp_path, monkeypatch):
    from latentdiag.models.registry import MAX_PARAMETERS, plan_model

    torch.manual_seed(0)
    model = build_model(SMALL)
    n = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    assert plan_model(SMALL).parameters == n and MAX_PARAMETERS == 2_000_000_000
    path = save_checkpoint(tmp_path / "small.pt", model)
    assert load_reference_checkpoint(path, max_parameters=n).parameters == n
    with pytest.raises(ResourceLimitError, match=rf"asks for {n:,} parameter and buffer elements.*limit of {n - 1:,}"):
        load_reference_checkpoint(path, max_parameters=n - 1)
    monkeypatch.setenv("LATENTDIAG_MAX_PARAMETERS", str(n - 1))
    with pytest.raises(ResourceLimitError, match=f"limit of {n - 1:,}"):
        load_reference_checkpoint(path)
    with pytest.raises(ResourceLimitError):
        load_model(path)
    with pytest.raises(ResourceLimitError):
        build_model(SMALL)                                       # the trainer's and the demo's builds too
    monkeypatch.setenv("LATENTDIAG_MAX_PARAMETERS", f"{n:.6e}")
    assert load_reference_checkpoint(path).parameters == n
    for bad in ("lots", "-5", "0", "nan"):
        monkeypatch.setenv("LATENTDIAG_MAX_PARAMETERS", bad)
        with pytest.raises(ValueError, match=f"LATENTDIAG_MAX_PARAMETERS must be a positive number.*{bad}"):
            build_model(SMALL)
    monkeypatch.delenv("LATENTDIAG_MAX_PARAMETERS")
    for bad in (True, 1.5, "10", 0):
        with pytest.raises(TypeError, match="max_parameters must be an integer >= 1"):
            build_model(SMALL, max_parameters=bad)


NONSENSE = [
    ("mlp_vae", {"input_shape": [1, 4, 4], "hidden": [-8]}, ValueError, r"hidden\[0\] must be an integer >= 1; got -8"),
    ("mlp_vae", {"input_shape": [1, 4, 4], "hidden": [True]}, TypeError, r"hidden\[0\] must be an integer"),
    ("mlp_vae", {"input_shape": [1, 4, 4], "hidden": [8.5]}, TypeError, r"hidden\[0\] must be an integer"),
    ("mlp_vae", {"input_shape": [1, "4", 4]}, TypeError, r"input_shape\[1\] must be an integer"),
    ("mlp_vae", {"input_shape": [1, 0, 4]}, ValueError, r"input_shape\[1\] must be an integer >= 1; got 0"),
    ("mlp_vae", {"input_shape": 16}, TypeError, r"input_shape must be a non-empty list"),
    ("mlp_vae", {"input_shape": [1, 4, 4], "latent_dim": False}, TypeError, r"latent_dim must be an integer"),
    ("mlp_vae", {"input_shape": [1, 4, 4], "likelihood": "gaussian"}, ValueError, r"likelihood must be one of"),
    ("mlp_vae", {"input_shape": [1, 4, 4], "likelihood": "categorical", "levels": 1}, ValueError, "levels"),
    ("lpvae_mnist", {"channels": -4}, ValueError, r"channels must be an integer >= 2; got -4"),
    ("lpvae_mnist", {"hidden": True}, TypeError, r"hidden must be an integer"),
    ("lpvae_mnist", {"res_blocks": 2.0}, TypeError, r"res_blocks must be an integer"),
    ("lpvae_mnist", {"batchnorm": "no"}, TypeError, r"batchnorm must be a bool"),
    ("lpvae_mnist", {"input_shape": [1, 8]}, ValueError, r"input_shape must be \[C, H, W\]"),
    ("lpvae_cifar", {"stages": 10**9}, ValueError, r"stages must be at most 30"),
    ("lpvae_mnist", {"no_such_option": 3}, TypeError, "no_such_option"),
    ("transformer_vae", {"vocab": 100, "d_model": 30, "heads": 4}, ValueError, "multiple of heads"),
    ("transformer_vae", {"vocab": 100, "max_len": -1}, ValueError, r"max_len must be an integer >= 1"),
    ("transformer_vae", {"vocab": True}, TypeError, "vocab must be"),
]


@pytest.mark.parametrize("name, kwargs, exc, match", NONSENSE,
                         ids=[f"{n}-{'-'.join(k)}-{i}" for i, (n, k, _, _) in enumerate(NONSENSE)])
def test_nonsense_values_get_a_clear_error_before_building(tmp_path, no_real_build, name, kwargs, exc, match):
    path = _crafted(tmp_path, {"name": name, "kwargs": kwargs})
    with pytest.raises(exc, match=match):
        load_reference_checkpoint(path)


def test_a_configuration_that_does_not_match_its_weights_is_refused_before_building(tmp_path, monkeypatch):
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "small.pt", build_model(SMALL))
    from latentdiag.models.checkpoint import content_hash

    for name, kwargs, words in [
        ("wider", {**SMALL["kwargs"], "hidden": [64]}, "of another shape (e.g. 'encoder.net.0.weight': the "
                                                       "configuration builds [64, 16], the file holds [8, 16])"),
        ("deeper", {**SMALL["kwargs"], "hidden": [8, 8]}, "missing"),
        ("cat", {**SMALL["kwargs"], "likelihood": "categorical", "levels": 4}, "of another shape"),
    ]:
        obj = torch.load(path, weights_only=True)
        obj["model"]["kwargs"] = kwargs
        obj["content_sha256"] = content_hash(obj)
        torch.save(obj, tmp_path / f"{name}.pt")
        import latentdiag.models.checkpoint as checkpoint

        with monkeypatch.context() as mp:
            mp.setattr(checkpoint, "_build", lambda *a: pytest.fail("built the model"))
            with pytest.raises(CheckpointReadError) as err:
                load_reference_checkpoint(tmp_path / f"{name}.pt")
        msg = str(err.value)
        assert f"{name}.pt" in msg and "does not match its recorded weights" in msg and words in msg, msg
    obj = torch.load(path, weights_only=True)
    obj["state_dict"]["encoder.net.0.weight"] = [1.0, 2.0]
    obj["content_sha256"] = content_hash(obj)
    torch.save(obj, tmp_path / "notensor.pt")
    with pytest.raises(CheckpointReadError, match="'state_dict' must be a dict of tensors"):
        load_reference_checkpoint(tmp_path / "notensor.pt")


@pytest.mark.parametrize("config", [
    SMALL,
    {"name": "lpvae_mnist", "kwargs": {"input_shape": [1, 8, 8], "horizon": 2, "hidden": 16, "channels": 8,
                                       "res_blocks": 1, "prior": "vlae_flow", "flow_hidden": 12, "latent_dim": 3}},
    {"name": "lpvae_mnist", "kwargs": {"input_shape": [1, 8, 8], "horizon": 3, "local_layer": "stacked",
                                       "hidden": 16, "channels": 8, "res_blocks": 1}},
    {"name": "lpvae_cifar", "kwargs": {"input_shape": [3, 8, 8], "width": 8, "stages": 2, "channels": 8,
                                       "res_blocks": 1, "cond_channels": 4}},
    {"name": "transformer_vae", "kwargs": {"vocab": 40, "d_model": 16, "heads": 2, "ff_dim": 8, "max_len": 12}},
], ids=["mlp", "lpvae-flow", "lpvae-stacked", "cifar", "transformer"])
def test_the_meta_count_equals_the_real_model(config):
    from latentdiag.models.registry import plan_model

    plan = plan_model(config)
    model = build_model(config)
    real = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert plan.shapes == real
    assert plan.parameters == sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    assert all(not p.is_meta for p in model.parameters())        # the real build is on the CPU


def test_bundled_paper_sizes_are_within_the_limit_and_checked_quickly():
    from latentdiag.models import reference_config
    from latentdiag.models.registry import plan_model

    for cfg in (reference_config("lpvae_mnist"), reference_config("lpvae_cifar"),
                reference_config("lpvae_mnist", horizon="full", prior="vlae_flow")):
        start = time.perf_counter()
        plan = plan_model(cfg)
        assert time.perf_counter() - start < 2.0 and 1e6 < plan.parameters < 1e8


def test_a_pythae_folder_whose_config_asks_for_enormous_layers_is_refused(tmp_path, monkeypatch):
    pytest.importorskip("pythae")
    from pythae.models import VAE

    from latentdiag.adapters.pythae import load_pythae_folder

    built = []
    monkeypatch.setattr(VAE, "load_state_dict", lambda self, *a, **k: built.append(self))
    folder = tmp_path / "pythae_model"
    folder.mkdir()
    (folder / "model_config.json").write_text('{"name": "VAEConfig", "input_dim": [1, 100000, 100000], '
                                              '"latent_dim": 2, "reconstruction_loss": "bce"}')
    torch.save({"model_state_dict": {}}, folder / "model.pt")
    start = time.perf_counter()
    with pytest.raises(ResourceLimitError) as err:
        load_pythae_folder(folder)
    assert time.perf_counter() - start < 5.0 and built == []
    assert "pythae model" in str(err.value) and "'input_dim' = [1, 100000, 100000]" in str(err.value)
    (folder / "model_config.json").write_text('{"name": "VAEConfig", "input_dim": [1, 4, 4], "latent_dim": 2, '
                                              '"reconstruction_loss": "bce"}')
    load_pythae_folder(folder)                                   # a normal size passes the check
    assert len(built) == 1
