"""How far to trust each explanation: checks that cnnlab runs on its own saliency maps.

A map that looks plausible can still say nothing about the network (Adebayo et al., "Sanity Checks
for Saliency Maps", NeurIPS 2018). Every CAM and attribution method of :mod:`cnnlab.viz` is put
through the same tests, on the same images, for each image's predicted class:

- **Model randomisation** (Adebayo et al., Sec. 3.1, cascading): re-initialise the network's layers
  from the top (fc, then conv5_x, … down to conv1), recompute the maps after each layer, and take
  the Spearman rank correlation ρ with the trained network's maps. A method whose maps survive the
  destruction of the weights explains the image, not the network: it fails when ρ is still at
  least :data:`MAX_RANDOMISED_RHO` once the top of the network (fc and conv5_x, where the class is
  decided) is re-initialised.
- **Data randomisation** (Adebayo et al., Sec. 3.2): the same architecture trained on permuted
  labels, a short run made here or one the caller gives; ρ with the trained network's maps again,
  and the same threshold.
- **Deletion and insertion** (Petsiuk, Das, Saenko, "RISE", BMVC 2018, Sec. 4.2): remove the pixels
  from the most important down (set to 0, the mean colour in normalised input, as RISE's code does),
  or insert them into a blurred copy, and follow the class probability; the area under each curve.
  A faithful map makes deletion fall fast (low AUC) and insertion rise fast (high AUC).
- **ROAD** (Rong, Leemann, Borisov, Kasneci, Kasneci, "A Consistent and Efficient Evaluation
  Strategy for Attribution Methods", ICML 2022): remove the most (MoRF) or least (LeRF) relevant
  pixels by noisy linear imputation, so that the shape of the hole does not tell the class, and
  combine as pytorch-grad-cam's ``ROADCombined`` does: the mean over removed fractions of
  (p_LeRF − p_MoRF) / 2. Higher is better.

Each faithfulness number is set beside that of a random map (uniform noise per pixel, seeded), the
baseline a method must beat on the same images by more than twice the standard error of the mean
difference (with a handful of images, a lucky draw is not a pass), at insertion and ROAD. Deletion
is reported but not judged: scattered pixels set to the mean colour destroy an image faster than any
one region, so a random map wins there against every smooth map (the artefact ROAD was designed to
avoid). The functions are written here rather than taken from a library:
Quantus and pytorch-grad-cam would be new dependencies for a few dozen lines each, and captum's
``infidelity`` and ``sensitivity_max`` measure other things (agreement with random perturbations,
stability under input noise). tests/test_sanity.py checks each against its definition.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnnlab.core.errors import UserError
from cnnlab.viz.layers import STAGES, layer_path, valid_names
from cnnlab.viz.shape import Channels, Target

__all__ = ["BASELINE", "MAX_RANDOMISED_RHO", "RANDOM_MAP", "Explainer", "Sanity", "cascade_layers", "cascade_steps",
           "deletion_insertion", "explain", "gaussian_blur", "impute", "random_map", "randomised", "road",
           "sanity_checks", "spearman", "train_on_permuted_labels"]

MAX_RANDOMISED_RHO = 0.5  # a method whose maps keep this rank correlation once the top is re-initialised fails
ROAD_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
ROAD_NOISE = 0.01  # σ of the noise added to imputed pixels, in network-input units (Rong et al.'s default)


@dataclass(frozen=True)
class Explainer:
    """A method, the options the checks run it with, and how its output becomes one importance per pixel."""

    method: Callable[..., Tensor]
    options: dict[str, Any] = field(default_factory=dict)
    signed: bool = False  # the sign says for or against the class
    cam: bool = False  # one map (B, 1, H, W) rather than one per colour channel

    def importance(self, a: Tensor) -> Tensor:
        """(B, C, H, W) → (B, H, W), larger = more important: a CAM's one channel; a signed attribution
        summed over colour channels; otherwise the largest magnitude over them (how saliency is drawn,
        Simonyan et al. 2014)."""
        if self.cam:
            return a[:, 0]
        return a.sum(1) if self.signed else a.abs().amax(1)


def random_map(model: nn.Module, x: Tensor, *, target: Target = None, layer: str | None = None,
               channels: Channels = None) -> Tensor:
    """The baseline: uniform noise (B, 1, H, W), the same for an image whatever the model, drawn on the CPU."""
    g = torch.Generator().manual_seed(0)
    return torch.rand((len(x), 1, *x.shape[-2:]), generator=g, dtype=x.dtype).to(x.device)


BASELINE = "random map"
RANDOM_MAP = Explainer(random_map, cam=True)


def explain(explainer: Explainer, model: nn.Module, x: Tensor, target: Tensor, **options: Any) -> Tensor:
    """The explainer's importance per pixel (B, H, W) for ``target`` (``options`` override its own)."""
    with warnings.catch_warnings():  # integrated gradients' own note on its precision is not news here
        warnings.simplefilter("ignore")
        return explainer.importance(explainer.method(model, x, target=target,
                                                     **{**explainer.options, **options}).detach())


def _ranks(v: Tensor) -> Tensor:
    """Ranks 1 … N of each row of ``v`` (B, N), ties sharing the mean of their ranks."""
    out = torch.empty_like(v, dtype=torch.float64)
    for row, values in enumerate(v):
        ordered, order = values.sort()
        _, inverse, counts = torch.unique_consecutive(ordered, return_inverse=True, return_counts=True)
        ends = counts.cumsum(0).double()
        mean_rank = ends - (counts.double() - 1) / 2  # of the tied block ending at rank `ends`
        out[row, order] = mean_rank[inverse]
    return out


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman's rank correlation of each image's two maps (B, …) → (B,): Pearson's r of the ranks,
    ties ranked by their mean. A constant map has no order: against another constant map the two
    agree (1), against any other they share none of its order (0)."""
    ra, rb = _ranks(a.flatten(1).cpu()), _ranks(b.flatten(1).cpu())
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    na, nb = ra.norm(dim=1), rb.norm(dim=1)
    rho = (ra * rb).sum(1) / (na * nb).clamp_min(1e-300)
    flat_a, flat_b = na == 0, nb == 0
    return torch.where(flat_a & flat_b, 1.0, torch.where(flat_a | flat_b, 0.0, rho))



def cascade_layers(model: nn.Module) -> list[str]:
    """The layers re-initialised one after another, from the top: fc, conv5_x … conv1."""
    return [n for n in reversed(valid_names(model)) if n in STAGES or n == "fc"]


def randomised(model: nn.Module, layers: Sequence[str], seed: int = 0) -> nn.Module:
    """A copy of ``model`` with every module inside ``layers`` re-initialised (``reset_parameters``:
    PyTorch's own initialisation; batch norms forget their statistics too). Drawn on the CPU from
    ``seed``, leaving the global random state alone."""
    device = next(model.parameters()).device
    clone = copy.deepcopy(model).cpu()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in layers:
            for module in clone.get_submodule(layer_path(clone, name)).modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
    return clone.to(device).eval()


def _pixel_order(importance: Tensor, seed: int = 0) -> Tensor:
    """Pixel indices (B, N) from the most to the least important; ties in a fixed random order
    (a CAM is zero over much of the image: ties in raster order would remove the top rows first)."""
    flat = importance.flatten(1)
    perm = torch.randperm(flat.shape[1], generator=torch.Generator().manual_seed(seed)).to(flat.device)
    return perm[torch.sort(flat[:, perm], dim=1, descending=True, stable=True).indices]


def _probabilities(model: nn.Module, x: Tensor, target: Tensor, batch_size: int = 256) -> Tensor:
    with torch.no_grad():
        return torch.cat([model(chunk).softmax(1).gather(1, t[:, None])[:, 0]
                          for chunk, t in zip(x.split(batch_size), target.split(batch_size))])


def _masks(order: Tensor, counts: Sequence[int], shape: torch.Size) -> Tensor:
    """(B, K, 1, H, W) masks, True on each image's ``counts[k]`` first pixels of ``order``."""
    b, n = order.shape
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=order.device).expand(b, n))
    k = torch.tensor(list(counts), device=order.device)
    return (rank[:, None, :] < k[None, :, None]).view(b, len(counts), 1, *shape[-2:])


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """``x`` (B, C, H, W) blurred by a normalised Gaussian of ``sigma`` pixels, edges replicated."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    c = x.shape[1]
    y = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1),
                 groups=c)
    return F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1),
                    groups=c)


def _auc(curve: Tensor) -> Tensor:
    """Trapezoid area under curves (B, K+1) sampled evenly on [0, 1]."""
    return (curve.sum(1) - (curve[:, 0] + curve[:, -1]) / 2) / (curve.shape[1] - 1)


@dataclass
class Curves:
    deletion: Tensor  # (B, steps + 1): class probability after removing 0, 1/steps, … 1 of the pixels
    insertion: Tensor  # (B, steps + 1): after inserting them into the blurred image

    @property
    def deletion_auc(self) -> Tensor:
        return _auc(self.deletion)

    @property
    def insertion_auc(self) -> Tensor:
        return _auc(self.insertion)


def deletion_insertion(model: nn.Module, x: Tensor, importance: Tensor, target: Tensor, *, steps: int = 16,
                       blur_sigma: float | None = None, seed: int = 0) -> Curves:
    """RISE's deletion and insertion curves (Petsiuk et al. 2018, Sec. 4.2), ``steps`` + 1 points each.

    Deletion sets the most important pixels to 0 (the mean colour of network input, which is what
    RISE's code substitutes on its normalised tensors); insertion puts them into a blurred copy.
    RISE blurs 224-pixel ImageNet images with σ = 5 pixels; the blur here is relative to the image,
    σ = side / 16 (2 pixels at 32, 14 at 224, where cnnlab's inputs are 32-pixel CIFAR images
    enlarged, so that a 5-pixel blur would leave them intact).
    """
    side = x.shape[-1]
    blurred = gaussian_blur(x, blur_sigma or side / 16)
    n = x.shape[-1] * x.shape[-2]
    counts = [round(k * n / steps) for k in range(steps + 1)]
    masks = _masks(_pixel_order(importance, seed), counts, x.shape)  # (B, K, 1, H, W)
    deleted = torch.where(masks, torch.zeros_like(x)[:, None], x[:, None])
    inserted = torch.where(masks, x[:, None], blurred[:, None])
    b, k = masks.shape[:2]
    t = target.repeat_interleave(k)
    return Curves(_probabilities(model, deleted.flatten(0, 1), t).view(b, k),
                  _probabilities(model, inserted.flatten(0, 1), t).view(b, k))


# Rong et al.'s neighbour weights: 1/6 for the four direct neighbours, 1/12 for the four diagonal ones.
_NEIGHBOURS = torch.tensor([[1 / 12, 1 / 6, 1 / 12], [1 / 6, 0.0, 1 / 6], [1 / 12, 1 / 6, 1 / 12]])


def impute(x: Tensor, removed: Tensor, *, noise: float = ROAD_NOISE, seed: int = 0, tolerance: float = 1e-4,
           max_iterations: int = 10_000, batch_size: int = 32) -> Tensor:
    """ROAD's noisy linear imputation: each ``removed`` pixel (mask (B, 1, H, W)) becomes the weighted
    mean of its neighbours inside the image, kept or imputed alike, plus Gaussian ``noise``.

    The means form the linear system L v = b, with L the graph Laplacian of the removed pixels under
    the neighbour weights (symmetric and positive definite when a pixel is kept, since every hole
    then borders a kept pixel) and b the weighted kept neighbours. Rong et al. solve it with a sparse
    direct solver; here conjugate gradients run in float64 on a batch of images and all their
    channels at once, with the Laplacian applied as a convolution, until the residual is
    ``tolerance`` of the right-hand side. The noise is drawn on the CPU from ``seed``.
    """
    g = torch.Generator().manual_seed(seed)
    jitter = noise * torch.randn(x.shape, generator=g, dtype=torch.float64)
    out = []
    for chunk, mask, extra in zip(x.split(batch_size), removed.split(batch_size), jitter.split(batch_size)):
        solved = _linear_imputation(chunk.double(), mask, tolerance, max_iterations)
        hole = mask.to(torch.float64).expand_as(solved)
        out.append((solved + hole * extra.to(solved.device)).to(x.dtype))
    return torch.cat(out)


def _linear_imputation(x: Tensor, removed: Tensor, tolerance: float, max_iterations: int) -> Tensor:
    b_, c, h, w = x.shape
    kernel = _NEIGHBOURS.to(x).view(1, 1, 3, 3)
    hole = removed.to(x.dtype).expand(b_, 1, h, w)
    kept = 1 - hole

    def spread(v: Tensor) -> Tensor:  # Σ over in-image neighbours of weight × v, per channel
        return F.conv2d(v.reshape(-1, 1, h, w), kernel, padding=1).view(v.shape)

    degree = spread(torch.ones_like(hole))  # Σ of the in-image neighbours' weights

    def laplacian(v: Tensor) -> Tensor:  # on the removed pixels; v is zero elsewhere
        return hole * (degree * v - spread(v * hole))

    rhs = hole * spread(x * kept)
    v = torch.zeros_like(x)
    r = rhs.clone()
    p = r.clone()
    rr = (r * r).flatten(1).sum(1)
    stop = tolerance ** 2 * rr
    tiny = torch.finfo(x.dtype).tiny
    for _ in range(max_iterations):
        if bool((rr <= stop).all()):
            break
        lp = laplacian(p)
        alpha = rr / (p * lp).flatten(1).sum(1).clamp_min(tiny)
        v = v + alpha.view(-1, 1, 1, 1) * p
        r = r - alpha.view(-1, 1, 1, 1) * lp
        rr_new = (r * r).flatten(1).sum(1)
        p = r + (rr_new / rr.clamp_min(tiny)).view(-1, 1, 1, 1) * p
        rr = rr_new
    return x * kept + hole * v


@dataclass
class Road:
    morf: Tensor  # (B, F): class probability with the most relevant fraction f removed
    lerf: Tensor  # (B, F): with the least relevant fraction removed

    @property
    def score(self) -> Tensor:
        """pytorch-grad-cam's ROADCombined: the mean over fractions of (p_LeRF − p_MoRF) / 2, per image."""
        return ((self.lerf - self.morf) / 2).mean(1)


def road(model: nn.Module, x: Tensor, importance: Tensor, target: Tensor, *,
         fractions: Sequence[float] = ROAD_FRACTIONS, noise: float = ROAD_NOISE, seed: int = 0) -> Road:
    """ROAD (Rong et al. 2022): the class probability after imputing the most and the least relevant
    ``fractions`` of the pixels away (:func:`impute`, with ``noise``)."""
    order = _pixel_order(importance, seed)
    n = order.shape[1]
    counts = [round(f * n) for f in fractions]
    morf = _masks(order, counts, x.shape)
    lerf = _masks(order.flip(1), counts, x.shape)
    b, k = morf.shape[:2]
    masks = torch.cat([morf, lerf], 1).flatten(0, 1)  # (B·2K, 1, H, W)
    images = x[:, None].expand(b, 2 * k, *x.shape[1:]).flatten(0, 1)
    probs = _probabilities(model, impute(images, masks, noise=noise, seed=seed),
                          target.repeat_interleave(2 * k)).view(b, 2 * k)
    return Road(probs[:, :k], probs[:, k:])


def train_on_permuted_labels(model: nn.Module, images: Tensor, labels: Tensor, to_input: Callable[[Tensor], Tensor],
                             *, epochs: int = 1, batch_size: int = 128, lr: float = 0.05, seed: int = 0) -> nn.Module:
    """A fresh copy of ``model``'s architecture trained on ``images`` with their labels permuted
    (Adebayo et al. 2018, Sec. 3.2): SGD with momentum 0.9 and weight decay 5e-4, no augmentation."""
    device = next(model.parameters()).device
    fresh = copy.deepcopy(model).cpu()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in fresh.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    fresh = fresh.to(device).train()
    g = torch.Generator().manual_seed(seed)
    permuted = labels[torch.randperm(len(labels), generator=g)]
    optimizer = torch.optim.SGD(fresh.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(len(labels), generator=g)
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                if len(idx) < 2:  # batch norm needs two images
                    continue
                loss = F.cross_entropy(fresh(to_input(images[idx].to(device))), permuted[idx].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    return fresh.eval()


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


@dataclass
class MethodResult:
    """One method's numbers, per image (means are what the table shows)."""

    randomisation: dict[str, list[float]]  # cascade step (the layer re-initialised last) → ρ per image
    random_labels: list[float] | None  # ρ with the model trained on permuted labels, per image
    deletion: list[float]  # deletion AUC per image
    insertion: list[float]  # insertion AUC per image
    road: list[float]  # ROAD per image
    road_morf: list[float]  # mean class probability per fraction removed, most relevant first
    road_lerf: list[float]  # … least relevant first

    def rho(self, step: str) -> float:
        return _mean(self.randomisation[step])

    def to_json(self) -> dict[str, Any]:
        return {"randomisation_rho": {step: self.rho(step) for step in self.randomisation},
                "random_labels_rho": None if self.random_labels is None else _mean(self.random_labels),
                "deletion_auc": _mean(self.deletion), "insertion_auc": _mean(self.insertion),
                "road": _mean(self.road), "road_morf": self.road_morf, "road_lerf": self.road_lerf,
                "per_image": {"randomisation_rho": self.randomisation, "random_labels_rho": self.random_labels,
                              "deletion_auc": self.deletion, "insertion_auc": self.insertion, "road": self.road}}


PASSES, FAILS, UNCLEAR, NOT_RUN = "passes", "fails", "unclear", "not run"


def compare(method: Sequence[float], baseline: Sequence[float], higher: bool) -> str:
    """Whether ``method`` does better than ``baseline`` on the same images: it passes by more than twice
    the standard error of the mean paired difference, fails when it does no better at all, and is
    unclear in between (with a handful of images, a lucky draw is not a pass)."""
    d = torch.tensor(list(method), dtype=torch.float64) - torch.tensor(list(baseline), dtype=torch.float64)
    d = d if higher else -d
    mean = float(d.mean())
    se = float(d.std() / math.sqrt(len(d))) if len(d) > 1 else math.inf
    return PASSES if mean > 2 * se else FAILS if mean <= 0 else UNCLEAR


@dataclass
class Sanity:
    """The outcome of :func:`sanity_checks`: a row per method and one for the random-map baseline."""

    methods: dict[str, MethodResult]
    baseline: MethodResult
    layers: list[str]  # cascade steps measured, each re-initialising every layer above it too
    judged: str  # the step the model randomisation check is judged at
    images: int
    deletion_steps: int
    road_fractions: list[float]
    random_labels_note: str  # how the data randomisation test was done, or why not
    maps: dict[str, list[Tensor]] = field(default_factory=dict, repr=False)  # method → the first image's map
    # for the trained model, then after each cascade step
    names: list[str] = field(default_factory=list)  # of the images, where the caller knows them

    def checks(self, name: str) -> dict[str, str]:
        """How method ``name`` does at each check (passes, fails, unclear or not run): its maps must change,
        by rank, once the top of the network is re-initialised and once it is trained on permuted labels;
        it must do better than the random map at insertion and ROAD.

        Deletion is measured but not judged against the random map: setting scattered pixels to the mean
        colour destroys an image faster than removing any one region, so a smooth map (every CAM) loses
        to noise there whatever it shows. That artefact is why Rong et al. remove pixels by imputation.
        """
        r, b = self.methods[name], self.baseline

        def below(values: Sequence[float] | None) -> str:
            return NOT_RUN if values is None else PASSES if _mean(values) < MAX_RANDOMISED_RHO else FAILS

        return {
            "model randomisation": below(r.randomisation[self.judged]),
            "data randomisation": below(r.random_labels),
            "insertion": compare(r.insertion, b.insertion, higher=True),
            "ROAD": compare(r.road, b.road, higher=True),
        }

    def verdict(self, name: str) -> str:
        """``passes``, or which checks it fails, or which remain unclear."""
        checks = self.checks(name)
        failed = [check for check, outcome in checks.items() if outcome == FAILS]
        unclear = [check for check, outcome in checks.items() if outcome == UNCLEAR]
        if failed:
            return "fails " + ", ".join(failed) + ("; unclear: " + ", ".join(unclear) if unclear else "")
        return "unclear: " + ", ".join(unclear) if unclear else PASSES

    def to_json(self) -> dict[str, Any]:
        return {
            "images": self.names,
            "methods": {name: {**r.to_json(), "checks": self.checks(name), "verdict": self.verdict(name)}
                        for name, r in self.methods.items()},
            "baseline": self.baseline.to_json(),
            "settings": {"images": self.images, "cascade": self.layers, "judged_at": self.judged,
                         "max_randomised_rho": MAX_RANDOMISED_RHO, "deletion_steps": self.deletion_steps,
                         "road_fractions": self.road_fractions, "random_labels": self.random_labels_note},
        }

    def rows(self) -> list[tuple[str, MethodResult, str]]:
        """(name, numbers, verdict) for each method, then the random-map baseline."""
        return [(n, r, self.verdict(n)) for n, r in self.methods.items()] + [(f"{BASELINE} (baseline)",
                                                                             self.baseline, "–")]

    def table(self) -> str:
        """The table as plain text, a row per method and the baseline last, then ρ at every cascade step."""
        lines = [f"{'method':<24} {'rand. ρ':>8} {'labels ρ':>8} {'deletion':>9} {'insertion':>9} {'ROAD':>7}  verdict",
                 f"{'':<24} {'↓':>8} {'↓':>8} {'AUC ↓':>9} {'AUC ↑':>9} {'↑':>7}"]
        for name, r, verdict in self.rows():
            labels = "–" if r.random_labels is None else f"{_mean(r.random_labels):.2f}"
            lines.append(f"{name:<24} {r.rho(self.judged):>8.2f} {labels:>8} {_mean(r.deletion):>9.3f} "
                         f"{_mean(r.insertion):>9.3f} {_mean(r.road):>7.3f}  {verdict}")
        lines += ["", f"rand. ρ: Spearman rank correlation with the trained network's maps once fc … {self.judged} are "
                      f"re-initialised; labels ρ: with a model trained on permuted labels; a method fails either at "
                      f"ρ ≥ {MAX_RANDOMISED_RHO}. Insertion and ROAD: a method passes when it beats the random map by "
                      f"two standard errors over the {self.images} images, fails when it does not beat it at all. "
                      "Deletion is not judged: scattered pixels set to the mean colour destroy an image faster than "
                      "any one region, so noise wins there.",
                  "", "model randomisation, ρ after re-initialising the layers from fc down to each (cascade):",
                  f"{'method':<24} " + " ".join(f"{s:>8}" for s in self.layers)]
        for name, r in self.methods.items():
            lines.append(f"{name:<24} " + " ".join(f"{r.rho(s):>8.2f}" for s in self.layers))
        return "\n".join(lines)


def cascade_steps(model: nn.Module, layers: Sequence[str] | None) -> tuple[list[str], str]:
    """The cascade steps to measure and the step the check is judged at, or a :class:`UserError` naming
    the bad step.

    Steps come in cascade order. The check is judged once the top of the network is re-initialised:
    the classifier and the last feature block (fc and conv5_x), where the class is decided; the
    last step always re-initialises the whole network. Both are measured whatever ``layers`` says.
    """
    order = cascade_layers(model)
    if not order:
        raise UserError("the model has none of the Table 1 layers fc, conv5_x … conv1 to re-initialise")
    bad = [n for n in layers or [] if n not in order]
    if bad:
        raise UserError(f"`layer` {bad[0]!r} cannot be a randomisation step; choose among {', '.join(order)}")
    judged = order[min(1, len(order) - 1)]
    wanted = set(layers or order) | {judged, order[-1]}
    return [n for n in order if n in wanted], judged


def sanity_checks(model: nn.Module, x: Tensor, explainers: Mapping[str, Explainer], *,
                  layers: Sequence[str] | None = None, random_labels: nn.Module | None = None,
                  random_labels_note: str = "not run", deletion_steps: int = 16,
                  road_fractions: Sequence[float] = ROAD_FRACTIONS, seed: int = 0,
                  options: dict[str, dict[str, Any]] | None = None,
                  progress: Callable[[str], None] | None = None) -> Sanity:
    """Run every check of each of the ``explainers`` (name → explainer) on the batch ``x`` (normalised
    input) for each image's predicted class.

    ``layers``: the cascade steps at which to measure (default all of fc, conv5_x … conv1); each
    step re-initialises every layer from the top down to it. conv5_x, where the check is judged, and
    the whole network are always measured. ``random_labels``: the model trained on permuted labels.
    ``options``: method name → options that override the explainer's own.
    """
    wanted, judged = cascade_steps(model, layers)
    say = progress or (lambda message: None)
    with torch.no_grad():
        target = model(x).argmax(1)
    checked = {**explainers, BASELINE: RANDOM_MAP}
    rows = list(checked)
    say(f"maps of {len(explainers)} methods on {len(x)} images")
    options = options or {}

    def maps_of(name: str, network: nn.Module) -> Tensor:
        return explain(checked[name], network, x, target, **options.get(name, {}))

    original = {n: maps_of(n, model) for n in rows}
    maps = {n: [original[n][0].cpu()] for n in rows}
    rhos: dict[str, dict[str, list[float]]] = {n: {} for n in rows}
    done: list[str] = []
    for layer in cascade_layers(model):
        done.append(layer)
        if layer not in wanted:
            continue
        say(f"model randomisation: re-initialised {', '.join(done)}")
        broken = randomised(model, done, seed=seed)
        for n in rows:
            m = maps_of(n, broken)
            rhos[n][layer] = spearman(m, original[n]).tolist()
            maps[n].append(m[0].cpu())
    labels_rho: dict[str, list[float] | None] = {n: None for n in rows}
    if random_labels is not None:
        say("data randomisation: the model trained on permuted labels")
        for n in rows:
            labels_rho[n] = spearman(maps_of(n, random_labels), original[n]).tolist()
    results = {}
    for n in rows:
        say(f"faithfulness of {n}")
        curves = deletion_insertion(model, x, original[n], target, steps=deletion_steps, seed=seed)
        removal = road(model, x, original[n], target, fractions=road_fractions, seed=seed)
        results[n] = MethodResult(rhos[n], labels_rho[n], curves.deletion_auc.tolist(), curves.insertion_auc.tolist(),
                                  removal.score.tolist(), removal.morf.double().mean(0).tolist(),
                                  removal.lerf.double().mean(0).tolist())
    baseline = results.pop(BASELINE)
    return Sanity(results, baseline, wanted, judged, len(x), deletion_steps, list(road_fractions),
                  random_labels_note, maps)
