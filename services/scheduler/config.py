"""The scheduler's settings: its flags, config-file keys and `xllm serve`'s P/D flags come from here."""

from __future__ import annotations

from dataclasses import dataclass

from common.service_config import add_service_arguments
from common.settings import SettingsParser, setting
from services.scheduler.dp_balance import BalanceSettings
from services.scheduler.encode_pool import DEFAULT_ENCODE_TIMEOUT_S
from services.scheduler.epd_placement import EP_D, PLACEMENTS
from services.scheduler.pd_policy import POLICIES, PdPolicy, make_policy
from services.scheduler.registry import DEFAULT_HEARTBEAT_TIMEOUT_S, DEFAULT_SUSPECT_AFTER_S

__all__ = ["SchedulerConfig", "build_parser"]


@dataclass
class SchedulerConfig:
    heartbeat_timeout: float = setting(DEFAULT_HEARTBEAT_TIMEOUT_S,
                                       "seconds without a heartbeat before an instance is declared dead "
                                       "(its requests migrate; an ipc:// worker whose process exited is dead at once)")
    suspect_after: float = setting(DEFAULT_SUSPECT_AFTER_S,
                                   "seconds without a heartbeat before an instance is suspect (no new work)")
    pd_policy: str = setting("static", "static: roles stay as started; dynamic: flip prefill/decode workers "
                                       "to meet the SLOs", choices=tuple(POLICIES))
    ttft_slo_ms: float = setting(2000.0, "time-to-first-token target (ms) of --pd-policy")
    tpot_slo_ms: float = setting(200.0, "time-per-output-token target (ms) of --pd-policy")
    policy_interval: float = setting(0.5, "seconds between PD policy decisions")
    kvstore: bool = setting(False, "follow the kvstore of this --run-dir (its DRAM/SSD blocks count for routing)")
    kvstore_addr: str | None = setting(None, "the kvstore's ROUTER address (implies --kvstore)")
    kvstore_events_addr: str | None = setting(None, "the kvstore's event PUB address")
    dp_balance: bool = setting(False, "DP load balance: move running decode sequences from an overloaded "
                                      "decode/mixed worker to one with room (KV moved, or recomputed when short)")
    dp_balance_threshold: int = setting(4, "sequences more on one worker than another before --dp-balance moves "
                                           "any (it then evens them to within 2)")
    dp_balance_interval_s: float = setting(0.5, "seconds between --dp-balance decisions")
    dp_balance_max_per_tick: int = setting(2, "sequences --dp-balance moves per decision at most")
    dp_balance_cooldown_s: float = setting(1.0, "seconds a worker rests after a --dp-balance move from or to it")
    dp_balance_recompute_below: int = setting(32, "sequences of fewer tokens are recomputed on the target "
                                                  "instead of moving their KV (0: always move the KV)")
    epd_placement: str = setting(EP_D, "where images are encoded: ep-d (the prefill worker), ed-p (encoders beside "
                                       "the decode workers), e-p-d (standalone encoders)", choices=PLACEMENTS)
    encode_timeout: float = setting(DEFAULT_ENCODE_TIMEOUT_S, "seconds an encoder may take on a request's images "
                                                              "before they are encoded elsewhere")
    expected_workers: int | None = setting(
        None, "workers this layout starts (xllm serve sets it): /health and /status report how many of them are up")

    def problems(self) -> list[str]:
        """What makes this configuration unusable, as flag-named messages."""
        problems = [f"--{name.replace('_', '-')} must be > 0"
                    for name in ("heartbeat_timeout", "suspect_after", "ttft_slo_ms", "tpot_slo_ms", "policy_interval",
                                 "encode_timeout")
                    if getattr(self, name) <= 0]
        problems += self.balance_settings().problems()
        if self.dp_balance_interval_s <= 0:
            problems.append("--dp-balance-interval-s must be > 0")
        if self.dp_balance_recompute_below < 0:
            problems.append("--dp-balance-recompute-below must be >= 0")
        if self.expected_workers is not None and self.expected_workers < 0:
            problems.append("--expected-workers must be >= 0")
        return problems

    def balance_settings(self) -> BalanceSettings:
        return BalanceSettings(threshold=self.dp_balance_threshold, max_per_tick=self.dp_balance_max_per_tick,
                               cooldown_s=self.dp_balance_cooldown_s)

    def make_policy(self) -> PdPolicy:
        return make_policy(self.pd_policy, self.ttft_slo_ms / 1000.0, self.tpot_slo_ms / 1000.0)


def build_parser() -> SettingsParser:
    parser = SettingsParser(prog="python -m services.scheduler", description="xllm global scheduler")
    add_service_arguments(parser)
    parser.add_settings(SchedulerConfig, "scheduler")
    return parser
