"""``lossy-code``: a decoder that models local structure makes the code lossy (Chen et al., "Variational Lossy
Autoencoder", 2017, Sections 3-4; the LPVAE study's Figure 8).

A factorised decoder (h = 0) must put everything into z; a local-window PixelCNN decoder (horizon h) models
local texture itself and leaves the global content (the digit's identity and shape) to z; the VLAE recipe adds
its autoregressive-flow prior and free bits on the total rate. The finding: the local decoders spend a lower rate,
the code still carries the global content (a linear probe on it stays high), and images decoded from one shared
z keep the input's global shape while their local details vary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from latentdiag._random import torch_generator
from latentdiag.studies._measures import likelihood_measures, representation_measures, xy
from latentdiag.studies.base import Measure, ModelRun, Study, Summary, Trend, trend_less

__all__ = ["LossyCode", "sample_from_code"]

_CPU = {"hidden": 256, "cond_channels": 8, "channels": 32, "res_blocks": 2}
_QUICK = {"hidden": 16, "cond_channels": 2, "channels": 4, "res_blocks": 1}


@torch.no_grad()
def sample_from_code(model: Any, z: torch.Tensor, shape: Sequence[int], *, seed: int = 0) -> torch.Tensor:
    """Ancestral samples x ~ p(x | z) of a decoder that exposes ``decoder_logits(x, z)`` (the protocol's
    teacher-forced per-position log-probabilities, (1, B, *shape, V)), one position at a time in raster order.

    Position t only depends on x_<t (the decoder is autoregressive or factorised), so filling the canvas in
    order and sampling position t from the logits given the canvas so far is exact ancestral sampling. Cost:
    one decoder pass per position (784 for MNIST), so keep the batch small.
    """
    gen = torch_generator(seed, "lossy_code.ancestral_sample")
    x = torch.zeros((z.shape[0], *shape), dtype=torch.long)
    flat = x.view(z.shape[0], -1)
    for t in range(flat.shape[1]):
        logp = model.decoder_logits(x, z.unsqueeze(0))[0]            # (B, *shape, V)
        probs = logp.reshape(z.shape[0], flat.shape[1], -1)[:, t].float().exp()
        flat[:, t] = torch.multinomial(probs / probs.sum(1, keepdim=True), 1, generator=gen).squeeze(1)
    return x


class LossyCode(Study):
    name = "lossy-code"
    title = "a local decoder makes the code lossy: a lower rate, the global content kept"
    paper = ("Chen, Kingma, Salimans, et al., \"Variational Lossy Autoencoder\" (ICLR 2017), Sections 3-4; "
             "Zhang et al. (2022), Figure 8")
    defaults = {"data": "mnist5k", "epochs": 10, "seeds": 1, "latent_dim": 32, "horizon": 2, "iw_samples": 10,
                "size": "cpu", "free_bits_total": 8.0, "flow_steps": 2, "flow_hidden": 256, "max_monitor": 500,
                "decoding_points": 200, "shared_inputs": 6, "shared_samples": 5}
    quick = {"data": "digits", "epochs": 1, "seeds": 1, "latent_dim": 4, "horizon": 1, "iw_samples": 2,
             "size": "quick", "free_bits_total": 1.0, "flow_steps": 1, "flow_hidden": 16, "max_monitor": 100,
             "decoding_points": 20, "shared_inputs": 2, "shared_samples": 2}
    data_choices = ("mnist5k", "digits", "mnist:")

    def plan(self, settings: Mapping[str, Any], measured: Mapping[str, Mapping[str, Measure]]) -> list[ModelRun]:
        sizes = dict(_QUICK if settings["size"] == "quick" else _CPU)
        h = settings["horizon"]

        def train(horizon: Any, prior: str, objective: Mapping[str, Any]) -> dict[str, Any]:
            out = {"model": "lpvae_mnist", "horizon": horizon, "latent_dim": settings["latent_dim"],
                   "likelihood": "bernoulli", "prior": prior, "data": settings["data"], "model_options": sizes,
                   "objective": dict(objective), "batch_size": 100, "lr": 1e-3}
            if prior == "vlae_flow":
                out["flow_steps"] = settings["flow_steps"]
                out["model_options"] = {**sizes, "flow_hidden": settings["flow_hidden"]}
            return out
        return [ModelRun("factorised", "factorised decoder (h=0)", train(0, "normal", {"name": "elbo"}),
                         meta={"horizon": 0}),
                ModelRun("local", f"local decoder (h={h})", train(h, "normal", {"name": "elbo"}), meta={"horizon": h}),
                ModelRun("vlae", f"VLAE (h={h}, flow prior, free bits {settings['free_bits_total']:g})",
                         train(h, "vlae_flow", {"name": "free_bits_total", "free_bits": settings["free_bits_total"]}),
                         meta={"horizon": h})]

    def measure(self, model: Any, run: ModelRun, data: Mapping[str, Any], settings: Mapping[str, Any],
                seed: int) -> tuple[dict[str, Measure], dict[str, Any]]:
        from latentdiag.estimators.decoding import decoding_divergence
        from latentdiag.estimators.encoded import encode

        test = data["test"]
        out = likelihood_measures(model, test, iw_samples=settings["iw_samples"], seed=seed)
        reps, _ = representation_measures(encode(model, xy(data["train"]), seed=seed),
                                          encode(model, xy(test), seed=seed), seed=seed, probe_seeds=1,
                                          nonlinear=False)
        out.update(reps)
        n = min(settings["decoding_points"], len(test.x))
        dd = decoding_divergence(model, test.x[:n], repeats=3, seed=seed)
        out["decoding_js"] = Measure(dd.js.value, dd.js.stderr, "nats")
        out["accuracy_drop"] = Measure(dd.accuracy_drop.value, dd.accuracy_drop.stderr, "")
        js_map = dd.by_position["js"].mean.reshape(dd.positions[-2:]) if dd.is_image else None
        k, s = settings["shared_inputs"], settings["shared_samples"]
        x = test.x[:k]
        with torch.no_grad():
            z = _posterior_draw(model, x, seed)
        samples = sample_from_code(model, z.repeat_interleave(s, 0), tuple(x.shape[1:]), seed=seed)
        art = {"js_map": js_map.tolist() if js_map is not None else None,
               "inputs": x.reshape(k, -1).tolist(), "samples": samples.reshape(k, s, -1).tolist(),
               "image_shape": list(x.shape[-2:])}
        return out, art

    def columns(self) -> list[tuple[str, str, int]]:
        return [("rate", "rate (nats)", 2), ("distortion", "distortion (nats)", 2), ("bpd", "IW bits/dim", 4),
                ("linear_probe", "linear probe on the code %", 1), ("decoding_js", "decoding JS (nats/pixel)", 4),
                ("accuracy_drop", "accuracy drop, prior vs posterior codes", 4)]

    def trends(self, runs: Sequence[ModelRun], table: Mapping[str, Mapping[str, Summary]],
               settings: Mapping[str, Any]) -> list[Trend]:
        f, local, vlae = (next(r for r in runs if r.key == k) for k in ("factorised", "local", "vlae"))
        get = lambda r, k: (r.label, table[r.key][k])  # noqa: E731
        out = [trend_less("the local decoder spends a lower rate than the factorised one", get(local, "rate"),
                          get(f, "rate")),
               trend_less("the VLAE spends a lower rate than the factorised decoder", get(vlae, "rate"), get(f, "rate")),
               trend_less("the local decoders model the data better (lower IW bits/dim)", get(local, "bpd"),
                          get(f, "bpd"))]
        for r in (local, vlae):
            a, b = table[f.key]["linear_probe"], table[r.key]["linear_probe"]
            out.append(Trend(f"the global content is kept: the linear probe on the {r.label} code is within 5 points "
                             "of the factorised code's", b.mean > a.mean - 5.0,
                             f"{f.label} {a.text(1)}%, {r.label} {b.text(1)}%"))
        for r in (local, vlae):
            js = table[r.key]["decoding_js"]
            out.append(Trend(f"the {r.label} decoder uses its code: decoding from the prior differs from decoding "
                             "from the posterior (JS > 2 SE)", js.mean > 2 * js.uncertainty,
                             f"JS {js.text(4)} nats per pixel"))
        return out

    def figures(self, result: Mapping[str, Any]) -> dict[str, Any]:
        import numpy as np
        from matplotlib.figure import Figure

        figs = {}
        models = result["models"]
        arts = [result["artifacts"].get(f"{m['key']}-seed0", {}) for m in models]
        if all(a.get("js_map") for a in arts):
            fig = Figure(figsize=(3.2 * len(models), 3.2), layout="constrained")
            for i, (m, a) in enumerate(zip(models, arts)):
                ax = fig.add_subplot(1, len(models), i + 1)
                im = ax.imshow(np.asarray(a["js_map"], dtype=float), cmap="magma")
                ax.set_title(m["label"], fontsize=8)
                ax.axis("off")
                fig.colorbar(im, ax=ax, shrink=0.7)
            figs["Decoding JS per pixel, prior codes vs posterior codes (nats)"] = fig
        for m, a in zip(models, arts):
            if not a.get("samples"):
                continue
            h, w = a["image_shape"]
            inputs, samples = np.asarray(a["inputs"], dtype=float), np.asarray(a["samples"], dtype=float)
            k, s = samples.shape[:2]
            fig = Figure(figsize=(1.1 * (s + 1), 1.1 * k), layout="constrained")
            for row in range(k):
                for col in range(s + 1):
                    ax = fig.add_subplot(k, s + 1, row * (s + 1) + col + 1)
                    img = inputs[row] if col == 0 else samples[row, col - 1]
                    ax.imshow(img.reshape(h, w), cmap="gray_r", vmin=0, vmax=1)
                    ax.axis("off")
            fig.suptitle(f"{m['label']}: input (left), then x ~ p(x|z') for one z' ~ q(z|x)", fontsize=8)
            figs[f"Images decoded from one shared code: {m['label']}"] = fig
        return figs


def _posterior_draw(model: Any, x: torch.Tensor, seed: int) -> torch.Tensor:
    """One z ~ q(z|x) per input, from a seeded generator."""
    q = model.encode(x)
    gen = torch_generator(seed, "lossy_code.posterior_draw")
    eps = torch.randn(q.mean.shape, generator=gen, dtype=q.mean.dtype)
    return q.mean + q.stddev * eps
