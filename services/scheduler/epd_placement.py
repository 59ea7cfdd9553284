"""EPD placements: where a multimodal request's images are encoded, and how the profiler chooses.

Three groupings of the Encode, Prefill and Decode stages (the xLLM report's EPD disaggregation):

- **EP-D**: the prefill worker runs the vision tower itself (the Assign carries pixels). No
  embedding crosses a process boundary; encode time adds to that worker's prefill queue.
- **ED-P**: encoders co-located with the decode workers. Concretely here: `xllm serve` starts one
  encoder process per decode worker (per mixed worker without P/D pools) on that worker's device
  (`--colocated-with <worker id>`); the scheduler sends each image request's encode to one of
  them, then assigns the prefill with the embeddings. Decode steps are memory-bound and leave the
  device's compute idle, which is what the encoder uses; the prefill workers do no vision work.
- **E-P-D**: standalone encoder instances (their own processes/devices, `--encoder-workers N`);
  the scheduler picks the least loaded.

The routing itself is `services.scheduler.encode_pool`; this module holds the names, the cost
model the profiler (`xllm profile epd`) fills in, the choice, and the JSON file that carries
the choice to `xllm serve --epd-placement auto`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

__all__ = ["EP_D", "ED_P", "E_P_D", "AUTO", "PLACEMENTS", "PLACEMENT_CHOICES", "EpdProfile", "PlacementChoice",
           "choose_placement", "write_choice", "read_choice", "default_profile_path"]

EP_D, ED_P, E_P_D, AUTO = "ep-d", "ed-p", "e-p-d", "auto"
PLACEMENTS = (EP_D, ED_P, E_P_D)  # what the scheduler runs
PLACEMENT_CHOICES = (AUTO, *PLACEMENTS)  # what `xllm serve --epd-placement` takes
# Predicted throughputs within this fraction of each other count as equal: then the lower
# TTFT wins, then the simpler placement (the order of PLACEMENTS).
_TIE = 0.05


@dataclass
class EpdProfile:
    """Measured costs (seconds) of one typical request's stages on the model and this machine,
    and the layout they would run on."""

    encode_s_per_image: float  # vision tower, one image (batch of one)
    images_per_request: float
    prefill_s: float  # prefill of the whole prompt (image tokens included), embeddings given
    decode_s: float  # all output tokens of one request, at the decode batch measured
    transfer_s_per_image: float  # one image's embeddings through the bus (encoder -> scheduler -> worker)
    prefill_workers: int = 1  # prefill instances (mixed workers count here without P/D pools)
    decode_workers: int = 1  # decode instances (the same processes as prefill_workers without P/D pools)
    encoder_workers: int = 1  # E-P-D encoders
    # True when every instance shares one pool of compute (a CPU box, one GPU): moving a stage to
    # another process adds no capacity, only transfer cost.
    shared_compute: bool = True

    def problems(self) -> list[str]:
        return [f"{f.name} must be >= 0" for f in fields(self)
                if isinstance(getattr(self, f.name), (int, float)) and getattr(self, f.name) < 0]


@dataclass
class PlacementChoice:
    placement: str
    reason: str
    # Per placement: predicted TTFT of an idle system and the busiest stage's seconds per request.
    predicted: dict[str, dict[str, float]]
    profile: EpdProfile | None = None


def _predict(p: EpdProfile) -> dict[str, dict[str, float]]:
    encode = p.encode_s_per_image * p.images_per_request
    transfer = p.transfer_s_per_image * p.images_per_request
    n_p, n_d, n_e = max(1, p.prefill_workers), max(1, p.decode_workers), max(1, p.encoder_workers)
    # Seconds of work per request each kind of instance does, then per instance of that kind.
    stages = {
        EP_D: {"prefill": (encode + p.prefill_s) / n_p, "decode": p.decode_s / n_d},
        ED_P: {"prefill": (p.prefill_s + transfer) / n_p, "decode": (p.decode_s + encode) / n_d},
        E_P_D: {"encode": encode / n_e, "prefill": (p.prefill_s + transfer) / n_p, "decode": p.decode_s / n_d},
    }
    predicted = {}
    for placement, load in stages.items():
        moved = 0.0 if placement == EP_D else transfer
        # Shared compute: every stage's work queues on the same cores, so the busiest "stage" is
        # the whole request; separate devices: the slowest stage paces the pipeline.
        busiest = (encode + p.prefill_s + p.decode_s + moved) if p.shared_compute else max(load.values())
        predicted[placement] = {"ttft_s": round(encode + moved + p.prefill_s, 6),
                                "busiest_stage_s_per_request": round(busiest, 6),
                                "requests_per_s": round(1.0 / busiest, 3) if busiest > 0 else float("inf")}
    return predicted


def choose_placement(profile: EpdProfile) -> PlacementChoice:
    """The placement with the highest predicted throughput (ties: lower TTFT, then simpler), and
    why, in numbers."""
    problems = profile.problems()
    if problems:
        raise ValueError(f"bad EPD profile: {'; '.join(problems)}")
    predicted = _predict(profile)
    best_busy = min(v["busiest_stage_s_per_request"] for v in predicted.values())
    close = [name for name in PLACEMENTS if predicted[name]["busiest_stage_s_per_request"] <= best_busy * (1 + _TIE)]
    chosen = min(close, key=lambda name: (predicted[name]["ttft_s"], PLACEMENTS.index(name)))
    encode = profile.encode_s_per_image * profile.images_per_request
    share = encode / max(1e-12, encode + profile.prefill_s)
    compute = ("every instance shares this machine's compute, so separating stages adds transfer, not capacity"
               if profile.shared_compute else "each instance has its own device")
    lines = [f"{name}: TTFT {v['ttft_s'] * 1000:.1f} ms, busiest stage {v['busiest_stage_s_per_request'] * 1000:.1f} "
             f"ms/request ({v['requests_per_s']:.2f} req/s)" for name, v in predicted.items()]
    reason = (f"{chosen} chosen: encode is {share:.0%} of encode+prefill ({encode * 1000:.1f} ms of images vs "
              f"{profile.prefill_s * 1000:.1f} ms prefill, {profile.decode_s * 1000:.1f} ms decode, "
              f"{profile.transfer_s_per_image * 1000:.2f} ms to move one image's embeddings); {compute}. "
              + "; ".join(lines))
    return PlacementChoice(chosen, reason, predicted, profile)


def default_profile_path(model: str | None) -> Path:
    """Where `xllm profile epd` writes and `xllm serve --epd-placement auto` reads the choice for
    `model`: one file per model directory, under the xllm cache directory."""
    base = os.environ.get("XLLM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "xllm")
    name = os.path.basename(os.path.normpath(model)) if model else "default"
    key = hashlib.sha256(os.path.abspath(model or "default").encode()).hexdigest()[:12]
    return Path(base) / "epd" / f"{name}-{key}.json"


def write_choice(path: str | os.PathLike, choice: PlacementChoice, model: str | None) -> None:
    """The profiler's output: the placement, why, the prediction and the measured costs."""
    body = {"model": os.path.abspath(model) if model else None, "placement": choice.placement,
            "reason": choice.reason, "predicted": choice.predicted,
            "profile": asdict(choice.profile) if choice.profile is not None else None}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(body, indent=2) + "\n")
    tmp.replace(path)


def read_choice(path: str | os.PathLike) -> tuple[str, str]:
    """(placement, reason) from a profiler file; ValueError naming the file when it is unusable."""
    try:
        body = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"no EPD profile at {path}: run `xllm profile epd --model DIR` first, or pick "
                         f"--epd-placement {'|'.join(PLACEMENTS)}") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the EPD profile {path}: {exc}") from None
    placement = body.get("placement") if isinstance(body, dict) else None
    if placement not in PLACEMENTS:
        raise ValueError(f"the EPD profile {path} names no placement of {PLACEMENTS} (got {placement!r})")
    return placement, str(body.get("reason", ""))
